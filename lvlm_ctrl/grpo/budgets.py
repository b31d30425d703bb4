"""Budget distributions for training (config group `budget`). Bounds of null take the feasible
range of the training environment (the fastest and slowest profiled configurations)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lvlm_ctrl.errors import UserError


def positive_ms(name: str, value, optional: bool = False) -> float | None:
    """A budget option as a positive, finite number of ms (None where optional), or a one-line error."""
    if value is None and optional:
        return None
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a number: give milliseconds, e.g. {name}=40") from None
    if not math.isfinite(ms) or ms <= 0:
        raise UserError(f"{name}={value!r}: give a positive, finite number of milliseconds")
    return ms


class Budgets:
    def bind(self, feasible: tuple[float, float]) -> Budgets:
        self.feasible = feasible
        return self


class Uniform(Budgets):
    """margin widens a null bound beyond the feasible range (0.1: 10% below and above), so that the
    policy also learns the edges, where validation and users' budgets land too."""

    def __init__(self, low_ms: float | None = None, high_ms: float | None = None, margin: float = 0.0):
        self.low_ms = positive_ms("budget.low_ms", low_ms, optional=True)
        self.high_ms = positive_ms("budget.high_ms", high_ms, optional=True)
        self.margin = margin

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        lo = self.low_ms if self.low_ms is not None else self.feasible[0] * (1 - self.margin)
        hi = self.high_ms if self.high_ms is not None else self.feasible[1] * (1 + self.margin)
        if not 0 < lo < hi:
            raise UserError(f"budget.low_ms and budget.high_ms must satisfy 0 < low < high, got {lo}, {hi}")
        return lo + (hi - lo) * torch.rand(n, generator=generator)


class Fixed(Budgets):
    def __init__(self, budget_ms: float):
        self.budget_ms = positive_ms("budget.budget_ms", budget_ms)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.full((n,), self.budget_ms)


class Normal(Budgets):
    def __init__(self, mean_ms: float | None = None, std_ms: float | None = None):
        self.mean_ms = positive_ms("budget.mean_ms", mean_ms, optional=True)
        self.std_ms = positive_ms("budget.std_ms", std_ms, optional=True)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        lo, hi = self.feasible
        mean = self.mean_ms if self.mean_ms is not None else (lo + hi) / 2
        std = self.std_ms if self.std_ms is not None else (hi - lo) / 4
        return (mean + std * torch.randn(n, generator=generator)).clamp(min=lo * 0.5)


class Trace(Budgets):
    """Budgets replayed in order (cycling) from a text file with one number per line."""

    def __init__(self, path: str):
        p = Path(path)
        if not p.exists():
            raise UserError(f"budget trace not found at {path}: give budget.path=FILE with one budget (ms) per line")
        try:
            values = [float(x) for x in p.read_text().split()]
        except ValueError as err:
            raise UserError(f"budget trace {path} holds a non-number ({err}); one budget in ms per line") from None
        if not values or any(not v > 0 for v in values):
            raise UserError(f"budget trace {path} must hold positive budgets in ms")
        self.values, self.pos = torch.tensor(values), 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = (torch.arange(n) + self.pos) % len(self.values)
        self.pos = int((self.pos + n) % len(self.values))
        return self.values[idx]
