"""The oracle (evaluation only): per sample, the most accurate profiled configuration whose
profiled latency fits the budget (ties to the lower latency); the fastest one when none fits.
It needs a profile of the evaluated split: controller=oracle profile.path=...
"""

from __future__ import annotations

import numpy as np

from lvlm_ctrl.errors import UserError
from lvlm_ctrl.knobs import Knobs
from lvlm_ctrl.profiling import KNOB_COLUMNS, read_profile


class OracleController:
    name = "oracle"

    def __init__(self, profile: str | None = None):
        self.profile_path = profile
        self.per_sample: dict[str, tuple] = {}

    def bind(self, backbone) -> OracleController:
        if not self.profile_path:
            raise UserError("controller=oracle needs profile.path=PATH (a profile of the evaluated split)")
        df = read_profile(self.profile_path)
        for sid, g in df.groupby("sample_id"):
            g = g.sort_values(["T_total_ms"])
            knobs = [Knobs(t, int(p), int(k), int(n)) for t, p, k, n in g[KNOB_COLUMNS].itertuples(index=False)]
            self.per_sample[str(sid)] = (g["T_total_ms"].to_numpy(float), g["accuracy"].to_numpy(float), knobs)
        self.latencies = df.groupby(KNOB_COLUMNS)["T_total_ms"].median()
        return self

    def default_budgets(self, n: int) -> list[float]:
        return [float(b) for b in np.linspace(self.latencies.min(), self.latencies.max(), n)]

    def decide(self, sample, budget_ms) -> Knobs:
        try:
            lat, acc, knobs = self.per_sample[sample.sample_id]
        except KeyError:
            raise UserError(f"sample {sample.sample_id} is not in the oracle's profile {self.profile_path}; "
                            "profile the evaluated split (same data.split and data.limit)") from None
        fit = int(np.searchsorted(lat, budget_ms, side="right"))
        if fit == 0:
            return knobs[0]
        # sorted by latency, so the first maximum is the fastest of the most accurate
        return knobs[int(np.argmax(acc[:fit]))]
