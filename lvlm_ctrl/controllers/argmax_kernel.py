"""The two-stage policy's argmax for one request at a time, in numpy.

At batch 1 on a CPU the heads' arithmetic is a few microseconds; what costs is torch's per-op
dispatch, run cold right after the backbone's forward pass (measured: ~0.5 ms for both stages in
torch against the ~0.3 ms that 1% of the full model allows). numpy calls are far cheaper, and the
budget's share of both first layers is folded into a per-budget bias, as the budget is the same
for many requests. The function is the same as TwoStagePolicy's greedy act (tests check it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lvlm_ctrl.grpo.policy import TwoStagePolicy

_C = math.sqrt(2.0 / math.pi)


def _gelu(x: np.ndarray) -> np.ndarray:  # nn.GELU(approximate="tanh")
    return 0.5 * x * (1.0 + np.tanh(_C * (x + 0.044715 * x * x * x)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


class ArgmaxKernel:
    def __init__(self, policy: TwoStagePolicy, d_model: int):
        self.policy, self.d = policy, d_model
        s1, s2 = policy.stage1, policy.stage2
        self.w1 = [_np(s1[0].weight[:, :d_model]), _np(s1[2].weight), _np(s1[4].weight)]
        self.b1 = [None, _np(s1[2].bias), _np(s1[4].bias)]
        self.w2 = [_np(s2[0].weight[:, :d_model]), _np(s2[2].weight), _np(s2[4].weight)]
        self.b2 = [None, _np(s2[2].bias), _np(s2[4].bias)]
        ins = policy.insertion_embed.weight
        self.ins_bias = _np(ins @ s2[0].weight[:, -ins.shape[1]:].T)  # (P, hidden)
        self.n_tier, self.n_topk = policy.n_tier, policy.n_topk
        self._budget: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    @torch.inference_mode()
    def budget_bias(self, budget_ms: float) -> tuple[np.ndarray, np.ndarray]:
        cached = self._budget.get(budget_ms)
        if cached is None:
            if len(self._budget) > 4096:
                self._budget.clear()
            pol, d = self.policy, self.d
            feat = pol.budget(torch.tensor([budget_ms]))[0]
            l1, l2 = pol.stage1[0], pol.stage2[0]
            cached = self._budget[budget_ms] = (_np(l1.bias + l1.weight[:, d:] @ feat),
                                                _np(l2.bias + l2.weight[:, d:d + feat.numel()] @ feat))
        return cached

    @staticmethod
    def _mlp(x: np.ndarray, first_bias: np.ndarray, w, b) -> np.ndarray:
        h = _gelu(w[0] @ x + first_bias)
        h = _gelu(w[1] @ h + b[1])
        return w[2] @ h + b[2]

    def stage1(self, lang: np.ndarray, budget_ms: float) -> tuple[int, int]:
        out = self._mlp(lang, self.budget_bias(budget_ms)[0], self.w1, self.b1)
        tier = int(out[: self.n_tier].argmax())
        ins = out[self.n_tier:].reshape(self.n_tier, -1)[tier]  # insertion logits at that tier
        return tier, int(ins.argmax())

    def stage2(self, token: np.ndarray, budget_ms: float, ins_idx: int, n_valid: int) -> tuple[int, int]:
        """n_valid: how many num_blocks options exist at this insertion (the rest are masked)."""
        out = self._mlp(token, self.budget_bias(budget_ms)[1] + self.ins_bias[ins_idx], self.w2, self.b2)
        n = self.n_topk
        return int(out[:n].argmax()), int(out[n:n + n_valid].argmax())
