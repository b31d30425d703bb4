"""The knob space: what a controller may choose, and which choices are valid together.

With L blocks and P insertion positions, a configuration is (tier, p, top_k, num_blocks) with
num_blocks in [p + L - P, L]. Blocks [0, p) always run at the default top_k; top_k applies to every
kept block at index >= p. The 5-wide num_blocks head indexes options as num_blocks = p + L - P + j.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lvlm_ctrl.errors import UserError


@dataclass(frozen=True)
class Knobs:
    tier: str
    insertion: int
    top_k: int
    num_blocks: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KnobSpace:
    tiers: tuple[str, ...] = ("low", "medium", "high")
    num_layers: int = 16
    insertions: tuple[int, ...] = (1, 2, 3, 4, 5)
    top_ks: tuple[int, ...] = (4, 5, 6, 7, 8)

    @classmethod
    def for_backbone(cls, tiers: tuple[str, ...], hooks, insertions=None, top_ks=None) -> KnobSpace:
        """The space a backbone offers: top_k options up to the routers' trained top_k (the five
        largest by default), insertion positions 1..P with P = 5 where the model is deep enough, so
        that every num_blocks option keeps the pinned blocks. Either list may be given instead (the
        model config's `insertions` / `top_ks`); 225 configurations for the embedded default."""
        L = hooks.num_layers
        trained = hooks.default_top_k
        if not trained:
            raise UserError(f"no MoE router with a top_k in the {L} decoder blocks: the top_k knob has nothing "
                            "to act on (a dense model, or a router this family's adapter does not know)")
        k = max(trained)
        fixed = len(set(hooks.pinned) | {0})
        if top_ks is None:
            top_ks = range(max(1, k - 4), k + 1)
        top_ks = tuple(sorted({int(t) for t in top_ks}))
        if not top_ks or top_ks[0] < 1 or top_ks[-1] > k:
            raise UserError(f"model.top_ks={list(top_ks)}: give top_k options between 1 and the trained top_k {k}")
        if insertions is None:
            insertions = range(1, max(1, min(5, L - 1, L + 1 - fixed)) + 1)
        insertions = tuple(sorted({int(p) for p in insertions}))
        space = cls(tiers=tuple(tiers), num_layers=L, insertions=insertions, top_ks=top_ks)
        if not insertions or insertions[0] < 1 or insertions[-1] >= L or \
                insertions != tuple(range(insertions[0], insertions[-1] + 1)) or \
                any(min(space.num_blocks_options(p)) < len(set(range(p)) | set(hooks.pinned)) for p in insertions):
            raise UserError(f"model.insertions={list(insertions)}: give consecutive positions in [1, {L - 1}] "
                            f"that leave room for the {fixed} blocks this model never skips")
        return space

    @property
    def min_kept_after(self) -> int:
        # L - P: how many blocks beyond p are always kept, so that p=P leaves exactly one option.
        return self.num_layers - len(self.insertions)

    @property
    def max_block_options(self) -> int:
        return self.num_layers - (self.insertions[0] + self.min_kept_after) + 1

    def num_blocks_options(self, insertion: int) -> list[int]:
        return list(range(insertion + self.min_kept_after, self.num_layers + 1))

    def num_blocks_mask(self, insertion: torch.Tensor) -> torch.Tensor:
        """(B,) insertion positions -> (B, max_block_options) bool mask of valid num_blocks slots."""
        slots = torch.arange(self.max_block_options, device=insertion.device)
        first = insertion[:, None] + self.min_kept_after
        return (first + slots) <= self.num_layers

    def configurations(self) -> list[Knobs]:
        return [
            Knobs(tier, p, k, n)
            for tier in self.tiers
            for p in self.insertions
            for k in self.top_ks
            for n in self.num_blocks_options(p)
        ]

    def full(self) -> Knobs:
        return Knobs(self.tiers[-1], self.insertions[0], max(self.top_ks), self.num_layers)

    def cheapest(self) -> Knobs:
        p = self.insertions[0]
        return Knobs(self.tiers[0], p, min(self.top_ks), self.num_blocks_options(p)[0])

    def validate(self, knobs: Knobs) -> Knobs:
        if knobs.tier not in self.tiers:
            raise UserError(f"unknown tier {knobs.tier!r}: choose one of {', '.join(self.tiers)}")
        if knobs.insertion not in self.insertions:
            raise UserError(f"insertion {knobs.insertion} is not in {list(self.insertions)}")
        if knobs.top_k not in self.top_ks:
            raise UserError(f"top_k {knobs.top_k} is not in {list(self.top_ks)}")
        options = self.num_blocks_options(knobs.insertion)
        if knobs.num_blocks not in options:
            raise UserError(
                f"num_blocks {knobs.num_blocks} is invalid at insertion {knobs.insertion}: "
                f"choose one of {options}"
            )
        return knobs

    def parse(self, tier, insertion, top_k, num_blocks) -> Knobs:
        """Knobs from user input (CLI overrides), with errors that name the bad value."""
        values = {}
        for name, value in (("insertion", insertion), ("top_k", top_k), ("num_blocks", num_blocks)):
            try:
                values[name] = int(value)
            except (TypeError, ValueError):
                raise UserError(f"{name} must be an integer, got {value!r}") from None
        return self.validate(Knobs(str(tier), **values))
