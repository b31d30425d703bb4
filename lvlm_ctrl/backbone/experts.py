"""The experts kernel the rollout engine runs: transformers' grouped matmuls over the picks that
carry weight.

The engine batches rows of different configurations through one call of a MoE layer
(`KnobHooks.per_row`): each token routes to its own row's top_k, padded to the widest with
zero-weight picks, and rows that skip the block or have not reached their insertion point route
nothing but such picks. transformers' `grouped_mm` runs every pick, and on the embedded default
27-33% of them are padding. This kernel drops the zero-weight picks first (their term in each
token's sum is zero: the same answers) and adds each pick's output into its token with `index_add_`
instead of gathering them back into pick order and summing (on CPU the gather cost as much as the
padding, README). `index_add_` adds in index order on CPU; elsewhere (CUDA's is atomic, so not
reproducible) the outputs go back to pick order and are summed as grouped_mm sums them.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _grouped_linear

NAME = "picked_mm"


def picked_mm_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    width = top_k_index.size(-1)
    weights = top_k_weights.reshape(-1)
    live = (weights != 0).nonzero()[:, 0]
    experts, order = torch.sort(top_k_index.reshape(-1)[live], stable=True)
    pick = live[order]
    token = pick // width
    # histc, not bincount: CPU histc wants floats, CUDA ints (as grouped_mm's own offsets)
    counts = torch.histc(experts.float() if experts.device.type in ("cpu", "mps") else experts.int(),
                         bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up, up_bias = (self.gate_up_proj, "gate_up_proj_bias") if self.has_gate else (self.up_proj, "up_proj_bias")
    out = _grouped_linear(hidden_states[token], up, offsets,
                          bias=getattr(self, up_bias)[experts] if self.has_bias else None,
                          is_transposed=self.is_transposed)
    out = self._apply_gate(out) if self.has_gate else self.act_fn(out)
    out = _grouped_linear(out, self.down_proj, offsets,
                          bias=self.down_proj_bias[experts] if self.has_bias else None,
                          is_transposed=self.is_transposed)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    out = out * weights[pick, None]
    if out.device.type == "cpu":
        total = out.new_zeros((hidden_states.shape[0], out.shape[-1])).index_add_(0, token, out)
    else:
        total = out.new_zeros((weights.shape[0], out.shape[-1])).index_copy_(0, pick, out)
        total = total.view(-1, width, out.shape[-1]).sum(dim=1)
    return total.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(NAME, picked_mm_experts_forward)
