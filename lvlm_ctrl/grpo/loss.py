"""GRPO: group-normalised advantages and the clipped surrogate, in one place.

Every variant is a switch: `scale_rewards` (group | batch | none), `clip_eps`, `kl_coef` (k3
estimator against the initial policy), `entropy_coef`; `num_iterations` reuses one batch of
rollouts for several steps (then the ratio to the sampling policy moves away from 1 and clipping
matters).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-6):
    """rewards (N, G) -> advantages (N, G) and the fraction of zero-std groups.

    A group whose G rewards are all equal carries no signal: its advantages are exactly 0, never NaN.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    centred = rewards - mean
    std = rewards.std(dim=1, keepdim=True, unbiased=False) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    zero = std.squeeze(1) < eps
    if scale_rewards == "group":
        adv = centred / torch.where(std < eps, torch.ones_like(std), std)
    elif scale_rewards == "batch":
        batch_std = rewards.std(unbiased=False)
        adv = centred / (batch_std if batch_std > eps else torch.ones_like(batch_std))
    elif scale_rewards == "none":
        adv = centred
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    adv = torch.where(zero[:, None], torch.zeros_like(adv), adv)
    return adv, zero.float().mean()


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2,
              logp_ref: torch.Tensor | None = None, kl_coef: float = 0.0, entropy: torch.Tensor | None = None,
              entropy_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All inputs flat (N*G,). Returns the loss and the statistics worth logging."""
    ratio = torch.exp(logp - logp_old)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -surrogate.mean()
    stats = {"clip_ratio": (((ratio < 1 - clip_eps) & (advantages < 0)) | ((ratio > 1 + clip_eps) & (advantages > 0)))
             .float().mean().detach(), "policy_loss": loss.detach()}
    if logp_ref is not None:
        delta = logp_ref - logp
        kl = (torch.exp(delta) - delta - 1).mean()  # k3: unbiased, always >= 0
        stats["kl"] = kl.detach()
        if kl_coef:
            loss = loss + kl_coef * kl
    if entropy is not None:
        stats["entropy"] = entropy.mean().detach()
        if entropy_coef:
            loss = loss - entropy_coef * entropy.mean()
    return loss, stats
