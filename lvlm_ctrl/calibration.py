"""Budgets that hold when the machine runs slower or faster than when it was profiled.

Controllers decide from profiled latency (the lookup table's, the GRPO controller's training
profile). Serving compares each request's measured latency with the profile's median for its
configuration and keeps, online:

  1. a calibration line, measured = a + b * profiled, fitted by exponentially weighted least squares
     (half-life `halflife` requests). Two parameters, not one factor for every configuration: a
     slowdown that adds a fixed cost to every request hits the cheap configurations hardest (the
     last single-factor attempt was too cautious at high budgets);
  2. a margin m >= 1 per budget band (bands 10% wide in log budget), moved by feedback on lateness
     as adaptive conformal inference does: after a late request log m rises by step * (1 - target),
     after one in time it falls by step * target, so the band's long-run late fraction settles at
     `target` whatever the line misses (a noisier machine has a longer tail). Per band, because
     lateness at one budget says nothing about another: one margin for all let 46% of the requests at
     one budget run late while nine others were kept. Requests for which nothing was predicted to
     fit do not move it. `min_margin` < 1 lets a margin fall below 1 as well, loosening a controller
     more careful than the machine needs; off by default (README: it brought careful online
     controllers to ~4% late, yet left them 1-2.6 points behind the profile-trained one).

A budget B on this machine is the budget (B / m - a) / b in the profile's terms, never more than B
(B / m for a margin below 1), which is what the controller then decides for. Before serving,
`warm_up` times a few configurations spread over the profiled latency range, so the line starts
from this machine's state instead of the profile's, and times the cheapest configuration `floor`
times, each after the costliest configuration: the 97.5th percentile of those, an estimate of its
95th that errs high, plus `drift`, is the lowest budget this machine can keep now (`floor_ms`),
where evaluate's default budget grid starts when it is above the profile's (a machine slower than
its profile cannot keep the profile's lowest budget, whatever the controller decides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class LatencyCalibration:
    enabled: bool = True
    halflife: float = 200.0     # requests
    target: float = 0.05        # the late fraction the margin steers to
    step: float = 0.05          # the margin's feedback gain (log scale)
    max_margin: float = 1.5
    min_margin: float = 1.0     # < 1: lateness under target loosens the budget too (below)
    warmup: int = 6             # configurations timed by warm_up (0 = none)
    floor: int = 40             # timings of the cheapest configuration at warm_up: the serving floor
    drift: float = 0.30         # the floor's allowance for the machine's drift over an evaluation
    prior: float = 4.0          # weight of the identity line (measured = profiled) before any request
    band: float = 0.1           # margins are kept per budget band of this relative width

    def __post_init__(self):
        for name in ("halflife", "step", "max_margin", "min_margin", "prior", "band", "drift"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"calibration.{name} must be a number >= 0, got {value!r}")
        if not 0 < self.target < 1:
            raise ValueError(f"calibration.target must be a fraction in (0, 1), got {self.target!r}")
        if not 0 < self.min_margin <= 1 <= self.max_margin:
            raise ValueError(f"calibration.min_margin={self.min_margin!r}, max_margin={self.max_margin!r}: "
                             "give 0 < min_margin <= 1 <= max_margin")
        self.forget = 0.5 ** (1.0 / max(self.halflife, 1.0))
        self.stats = np.zeros(5)  # weighted sums of 1, x, y, x^2, xy
        self.log_margins: dict[int, float] = {}
        self.seen = 0
        self.floor_ms: float | None = None

    def reset(self, profiled_range: tuple[float, float]) -> None:
        """Start from the identity line over the profile's latency range."""
        self.stats[:] = 0.0
        self.log_margins, self.seen = {}, 0
        for x in profiled_range:
            self._add(x, x, self.prior / 2)

    def _add(self, x: float, y: float, w: float = 1.0) -> None:
        self.stats *= self.forget
        self.stats += w * np.array([1.0, x, y, x * x, x * y])

    @property
    def line(self) -> tuple[float, float]:
        """(a, b): measured = a + b * profiled."""
        n, sx, sy, sxx, sxy = self.stats
        if n <= 0:
            return 0.0, 1.0
        var = sxx - sx * sx / n
        # the slope is kept near 1 while the served latencies barely spread (one configuration served
        # for a while): the ridge is a profile's worth of 1 ms^2 of spread
        ridge = 1e-2 * n
        b = (sxy - sx * sy / n + ridge) / (var + ridge)
        b = min(max(b, 0.3), 5.0)
        return (sy - b * sx) / n, b

    def _band(self, budget_ms: float) -> int:
        return round(math.log(max(budget_ms, 1e-3)) / math.log1p(max(self.band, 1e-3)))

    def margin(self, budget_ms: float) -> float:
        return math.exp(self.log_margins.get(self._band(budget_ms), 0.0))

    def predict(self, profiled_ms: float) -> float:
        a, b = self.line
        return a + b * profiled_ms

    def profiled_budget(self, budget_ms: float) -> float:
        """The budget as the profile's machine would see it (what the controller decides for)."""
        if not self.enabled:
            return budget_ms
        a, b = self.line
        m = self.margin(budget_ms)
        # never looser than the budget itself on the line's word: a machine faster than its profile
        # in the median says nothing about the profile's tail, which the controllers' choices are
        # made of (on a GPU whose profile ran slow, loosening made 47-57% of requests late at mid
        # budgets). A margin below 1 is the band's own lateness saying so, and may.
        return min(max((budget_ms / m - a) / b, 1e-3), budget_ms / min(m, 1.0))

    def observe(self, profiled_ms: float, measured_ms: float, budget_ms: float | None = None,
                predicted_to_fit: bool = True) -> None:
        """One served request: its configuration's profiled median and its measured latency."""
        if not self.enabled or not (profiled_ms > 0 and measured_ms > 0) or not math.isfinite(profiled_ms):
            return
        pred = self.predict(profiled_ms)
        # one request stalled by something else moves the line little
        self._add(profiled_ms, min(max(measured_ms, 0.67 * pred), 1.5 * pred))
        self.seen += 1
        if budget_ms is not None and predicted_to_fit:
            late = float(measured_ms > budget_ms)
            band = self._band(budget_ms)
            log_m = self.log_margins.get(band, 0.0) + self.step * (late - self.target)
            self.log_margins[band] = min(max(log_m, math.log(self.min_margin)), math.log(self.max_margin))

    def warm_up(self, run, configurations: list[tuple[object, float]], overhead_ms: float = 0.0) -> None:
        """run(knobs) -> measured ms; configurations: (knobs, profiled median) pairs. Times `warmup` of
        them, spread evenly over their profiled latency, twice each (the first run of a configuration
        can pay for lazy initialisation). Then the floor: the cheapest configuration `floor` times, each
        after the costliest one, plus the controller's own time per request (`overhead_ms`). Timed
        back to back, the same configuration stays in the caches and runs faster than it is served:
        after a high-tier request its vision stage took 2.6 ms instead of 2.0 (the default toy,
        this machine), so the floor is timed after the request that costs it most."""
        if not self.enabled or not configurations:
            return
        ordered = sorted(configurations, key=lambda c: c[1])
        if self.warmup:
            picks = np.unique(np.linspace(0, len(ordered) - 1, self.warmup).round().astype(int))
            for i in picks:
                knobs, profiled = ordered[i]
                run(knobs)
                self.observe(profiled, run(knobs))
        if self.floor:
            knobs, profiled = ordered[0]
            times = []
            for i in range(self.floor):
                run(ordered[-1][0])  # untimed: the costliest configuration leaves the caches colder than any
                times.append(run(knobs) + overhead_ms)
                self.observe(profiled, times[-1])
            # a warm-up of seconds cannot see how the machine drifts over the minutes an evaluation
            # lasts: its estimate alone left the lowest budget 6.2% late (1,000 requests, all at the
            # cheapest configuration, whose p95 came out 0.4% above it)
            self.floor_ms = float(np.percentile(times, 97.5)) * (1 + self.drift)

    def state(self) -> dict:
        a, b = self.line
        margins = {f"{(1 + self.band) ** k:.1f}": math.exp(v) for k, v in sorted(self.log_margins.items())}
        return {"enabled": self.enabled, "a_ms": a, "b": b, "floor_ms": self.floor_ms, "margins": margins,
                "requests": self.seen}
