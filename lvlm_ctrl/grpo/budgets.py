"""Budget distributions for training (config group `budget`). Bounds of null take the feasible
range of the training environment (the fastest and slowest profiled configurations)."""

from __future__ import annotations

from pathlib import Path

import torch

from lvlm_ctrl.errors import UserError


class Budgets:
    def bind(self, feasible: tuple[float, float]) -> Budgets:
        self.feasible = feasible
        return self


class Uniform(Budgets):
    """margin widens a null bound beyond the feasible range (0.1: 10% below and above), so that the
    policy also learns the edges, where validation and users' budgets land too."""

    def __init__(self, low_ms: float | None = None, high_ms: float | None = None, margin: float = 0.0):
        self.low_ms, self.high_ms, self.margin = low_ms, high_ms, margin

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        lo = self.low_ms if self.low_ms is not None else self.feasible[0] * (1 - self.margin)
        hi = self.high_ms if self.high_ms is not None else self.feasible[1] * (1 + self.margin)
        if not 0 < lo < hi:
            raise UserError(f"budget.low_ms and budget.high_ms must satisfy 0 < low < high, got {lo}, {hi}")
        return lo + (hi - lo) * torch.rand(n, generator=generator)


class Fixed(Budgets):
    def __init__(self, budget_ms: float):
        if not budget_ms or budget_ms <= 0:
            raise UserError(f"budget.budget_ms must be positive, got {budget_ms}")
        self.budget_ms = float(budget_ms)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.full((n,), self.budget_ms)


class Normal(Budgets):
    def __init__(self, mean_ms: float | None = None, std_ms: float | None = None):
        self.mean_ms, self.std_ms = mean_ms, std_ms

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
