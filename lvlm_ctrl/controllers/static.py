"""One fixed configuration for every request (default: the full model)."""

from __future__ import annotations

from lvlm_ctrl.knobs import Knobs


class StaticController:
    name = "static"

    def __init__(self, tier: str | None = None, insertion: int | None = None, top_k: int | None = None,
                 num_blocks: int | None = None):
        self.requested = (tier, insertion, top_k, num_blocks)
        self.knobs: Knobs | None = None

    def bind(self, backbone) -> StaticController:
        full = backbone.space.full()
        tier, p, k, n = (req if req is not None else dflt
                         for req, dflt in zip(self.requested, (full.tier, full.insertion, full.top_k, full.num_blocks)))
        self.knobs = backbone.space.parse(tier, p, k, n)
        return self

    def decide(self, sample, budget_ms: float | None) -> Knobs:
        return self.knobs
