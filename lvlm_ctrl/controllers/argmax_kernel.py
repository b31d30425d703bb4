"""The two-stage policy's argmax for one request at a time, in numpy.

At batch 1 on a CPU the heads' arithmetic is a few microseconds; what costs is the number of calls,
each run on a cold cache right after the backbone's forward pass (measured on the 2-core machine:
3-30 us per numpy call, ~0.5 ms for both stages through torch's dispatch against the ~0.3 ms that
1% of the full model allows). So the kernel makes as few calls as it can: the budget's share of
both first layers, and stage 1's decision's share of stage 2's, are folded into one bias per
budget (the budget is the same for many requests), the mean's 1/n is applied after the first
matmul, and buffers are preallocated. The function is TwoStagePolicy's greedy act (tests check it),
with the argmax guard (policy.fitting) when `p95_ms` is given: its masks are per budget too.
"""

from __future__ import annotations

import numpy as np
import torch

from lvlm_ctrl.grpo.policy import MASKED, TwoStagePolicy, fitting


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


class ArgmaxKernel:
    def __init__(self, policy: TwoStagePolicy, d_model: int, p95_ms: torch.Tensor | dict | None = None):
        """p95_ms: the guard's profiled p95 per configuration, or {input group: that} (controller.group_by)."""
        self.policy, self.d, self.p95 = policy, d_model, p95_ms
        s1, s2 = policy.stage1, policy.stage2
        self.n_input = n_in = policy.n_input
        self.w1 = (_np(s1[0].weight[:, :d_model]), _np(s1[2].weight), _np(s1[4].weight))
        self.w_size = _np(s1[0].weight[:, d_model:d_model + n_in]) if n_in else None
        self.b1 = (_np(s1[2].bias), _np(s1[4].bias))
        self.d2 = d2 = d_model + policy.n_counts  # stage 2's token: the latency token, then its token counts
        self.w2 = (_np(s2[0].weight[:, :d2]), _np(s2[2].weight), _np(s2[4].weight))
        self.b2 = (_np(s2[2].bias), _np(s2[4].bias))
        dec = policy.decision_embed.weight
        self.decision_bias = _np(dec @ s2[0].weight[:, -dec.shape[1]:].T)  # (tiers * P, hidden)
        self.n_tier, self.n_ins, self.n_topk, self.n_blocks = policy.n_tier, policy.n_ins, policy.n_topk, policy.n_blocks
        hidden = self.w1[1].shape[0]
        self._h, self._first = np.empty(hidden, np.float32), np.empty(hidden, np.float32)
        self._budget: dict[float, tuple] = {}

    @torch.inference_mode()
    def budget_bias(self, budget_ms: float, group: str | None = None) -> tuple:
        """-> stage 1's first-layer bias (hidden,) and stage 2's per stage-1 decision (tiers * P, hidden),
        then the guard's masks to add to the logits (for the input's group), or None: tiers (T,),
        insertions (T, P), top_k (T * P, K) and num_blocks (T * P, K, N)."""
        cached = self._budget.get((budget_ms, group))
        if cached is None:
            if len(self._budget) > 4096:
                self._budget.clear()
            pol, d = self.policy, self.d
            feat = pol.budget(torch.tensor([budget_ms]))[0]
            l1, l2 = pol.stage1[0], pol.stage2[0]
            masks = None
            if self.p95 is not None:
                p95 = self.p95 if not isinstance(self.p95, dict) else self.p95.get(group)
                if p95 is None:
                    p95 = torch.stack(list(self.p95.values())).nan_to_num(float("inf")).amax(0)  # unseen group: the worst
                fits = fitting(p95, torch.tensor([budget_ms]))[0]
                masks = tuple(np.where(ok.numpy(), np.float32(0), np.float32(MASKED)) for ok in (
                    fits.flatten(1).any(-1), fits.flatten(2).any(-1), fits.flatten(0, 1).any(-1), fits.flatten(0, 1)))
            cached = self._budget[(budget_ms, group)] = (
                _np(l1.bias + l1.weight[:, d + self.n_input:] @ feat),
                _np(l2.bias + l2.weight[:, self.d2:self.d2 + feat.numel()] @ feat) + self.decision_bias, masks)
        return cached

    def _hidden(self, first: np.ndarray, w, b) -> np.ndarray:
        """Layers 2 and 3 after the first layer's pre-activation `first` (ReLU in place)."""
        h = self._h
        np.maximum(first, 0, out=first)
        np.dot(w[1], first, out=h)
        h += b[0]
        np.maximum(h, 0, out=h)
        out = w[2] @ h
        out += b[1]
        return out

    def language(self, lang_sum: np.ndarray, n_tokens: int) -> np.ndarray:
        """Stage 1's first layer on the question alone: (W_lang @ lang_sum) / n_tokens, from the sum
        of the question's input embeddings over its n_tokens tokens. Depends on the question only, so
        serving caches it per question (GRPOController)."""
        first = self.w1[0] @ lang_sum
        first *= np.float32(1.0 / n_tokens)
        return first

    def stage1(self, question_feature: np.ndarray, budget_ms: float, size: np.ndarray | None = None,
               group: str | None = None) -> tuple[int, int]:
        """question_feature: language(...) of the request's question (read, never written: cached);
        size: the image's image_size_features when the policy reads them; group: the input's group
        for the guard (controller.group_by)."""
        bias, _, masks = self.budget_bias(budget_ms, group)
        first = np.add(question_feature, bias, out=self._first)
        if self.w_size is not None:
            first += self.w_size @ size
        out = self._hidden(first, self.w1, self.b1)
        tiers = out[: self.n_tier]
        if masks is not None:
            tiers += masks[0]
        tier = int(tiers.argmax())
        start = self.n_tier + tier * self.n_ins  # insertion logits at that tier
        ins = out[start:start + self.n_ins]
        if masks is not None:
            ins += masks[1][tier]
        return tier, int(ins.argmax())

    def stage2(self, token: np.ndarray, budget_ms: float, tier_idx: int, ins_idx: int, n_valid: int,
               group: str | None = None) -> tuple[int, int]:
        """token: the latency token, with token_count_features appended when the policy reads them;
        n_valid: how many num_blocks options exist at this insertion (the rest are masked)."""
        _, bias, masks = self.budget_bias(budget_ms, group)
        decision = tier_idx * self.n_ins + ins_idx
        first = self.w2[0] @ token
        first += bias[decision]
        out = self._hidden(first, self.w2, self.b2)
        top_k = out[:self.n_topk]
        if masks is not None:
            top_k += masks[2][decision]
        k = int(top_k.argmax())
        start = self.n_topk + k * self.n_blocks  # num_blocks logits at that top_k
        blocks = out[start:start + n_valid]
        if masks is not None:
            blocks += masks[3][decision, k, :n_valid]
        return k, int(blocks.argmax())
