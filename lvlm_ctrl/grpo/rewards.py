"""Reward = accuracy minus budget-violation penalties (seeds/000); every term and weight is config.

    accuracy            w * acc
    violation_sq        -w * over ** 2     squared relative violation, over = (lat - budget) / budget
    violation_rel       -w * over          linear relative violation   (over in [0, max_over])
    latency_sigmoid     -w * sigmoid((lat / budget - 1) / temperature) soft penalty near the budget
    complexity          -w * relative cost of the configuration (tier x top_k x blocks, in [0, 1])
    efficiency          +w * (1 - lat / budget) when within budget and correct
    slo                 -w when the configuration misses the budget on more than slo_max_violation of
                        the training samples (the service-level objective: at most 5% late)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RewardConfig:
    accuracy: float = 1.0
    violation_sq: float = 2.0
    violation_rel: float = 1.0
    latency_sigmoid: float = 0.0
    sigmoid_temperature: float = 0.05
    complexity: float = 0.0
    efficiency: float = 0.05
    slo: float = 0.0
    slo_max_violation: float = 0.05
    slo_tolerance: float = 0.05  # late means over budget x (1 + tolerance), as the lookup table counts it
    max_over: float | None = 0.5  # unbounded, a budget far below the feasible range gives rewards of -10
    # and more; those groups outweigh every accuracy difference and stage 1 collapses in 40 steps


def reward_components(cfg: RewardConfig, accuracy: torch.Tensor, latency: torch.Tensor, budget: torch.Tensor,
                      complexity: torch.Tensor, miss_rate: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """miss_rate: per row, how often its configuration runs over its budget (ProfileEnv.miss_rate);
    needed when cfg.slo is on. A single rollout's latency cannot tell 4% late from 6% late."""
    over = ((latency - budget) / budget).clamp(min=0, max=cfg.max_over)
    ratio = latency / budget
    within = (latency <= budget).float()
    return {
        "accuracy": cfg.accuracy * accuracy,
        "violation_sq": -cfg.violation_sq * over.pow(2),
        "violation_rel": -cfg.violation_rel * over,
        "latency_sigmoid": -cfg.latency_sigmoid * torch.sigmoid((ratio - 1) / cfg.sigmoid_temperature),
        "complexity": -cfg.complexity * complexity,
        "efficiency": cfg.efficiency * (1 - ratio).clamp(min=0) * within * (accuracy > 0).float(),
        "slo": (-cfg.slo * (miss_rate > cfg.slo_max_violation).float() if cfg.slo
                else torch.zeros_like(accuracy)),
    }


def total_reward(components: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(components.values())).sum(0)
