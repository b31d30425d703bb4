"""The two-stage policy (seeds/000): stage 1 picks (tier, p) from the question and the budget
before the image is seen; stage 2 picks (top_k, num_blocks) from the latency token of the serving
forward pass. log pi(config) is the sum of the four heads' log-probabilities; num_blocks options
that are invalid at p are masked, so they are never sampled and carry no probability. Each head
after the first is conditioned on the one before it within its stage (insertion on the tier,
num_blocks on top_k): what fits a budget is a property of the pair, not of either knob alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from lvlm_ctrl.knobs import Knobs, KnobSpace

MASKED = -1e9
IMAGE_SIZE_FEATURES = 2


def image_size_features(sizes) -> np.ndarray:
    """(B, 2) float32: log2 of an image's width and height over 256 px, from (width, height) pairs. In
    numpy: serving computes it per request, where a torch call costs more than the arithmetic."""
    return np.log2(np.maximum(np.array([tuple(s) for s in sizes], np.float32).reshape(-1, 2), 1.0) / 256.0)


TOKEN_COUNT_FEATURES = 2


def token_count_features(vision_tokens, text_tokens) -> np.ndarray:
    """(..., 2) float32: log2 of the request's vision and text token counts over 8, known at the
    insertion point (the prompt is encoded by then); stage 2 reads them beside the latency token."""
    counts = np.stack(np.broadcast_arrays(np.asarray(vision_tokens, np.float32), np.asarray(text_tokens, np.float32)), -1)
    return np.log2(counts + 1.0) / 8.0


HEADS = ("tier", "insertion", "top_k", "num_blocks")
STAGE2 = ("top_k", "num_blocks")


class BudgetEncoding(nn.Module):
    """Sinusoidal features of log(budget) (256-d), then an MLP."""

    def __init__(self, dim: int = 256, hidden: int = 256, min_ms: float = 1.0, max_ms: float = 1e5):
        super().__init__()
        self.dim = dim
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.log_min, self.log_max = math.log(min_ms), math.log(max_ms)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, budget_ms: torch.Tensor) -> torch.Tensor:
        x = (torch.log(budget_ms.float().clamp(min=1e-3)) - self.log_min) / (self.log_max - self.log_min)
        angles = x[:, None] * self.freqs[None] * math.pi
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    # ReLU: serving (controllers/argmax_kernel.py) computes the same function in numpy, where each
    # call costs ~3-30 us right after a forward pass; ReLU is one call, tanh-GELU eight
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


def given(logits: torch.Tensor):
    """logits (B, options, choices) -> a function: the chosen option per row (B,) -> the distribution
    over choices at that option (a head conditioned on the head before it)."""
    return lambda chosen: Categorical(logits=logits[torch.arange(len(chosen)), chosen])


@dataclass
class Decision:
    """Indices into the knob space's options, one per head; (B,) long tensors."""

    tier: torch.Tensor
    insertion: torch.Tensor
    top_k: torch.Tensor
    num_blocks: torch.Tensor

    def knobs(self, space: KnobSpace) -> list[Knobs]:
        out = []
        for t, p, k, n in zip(self.tier.tolist(), self.insertion.tolist(), self.top_k.tolist(), self.num_blocks.tolist()):
            ins = space.insertions[p]
            out.append(Knobs(space.tiers[t], ins, space.top_ks[k], space.num_blocks_options(ins)[0] + n))
        return out


class TwoStagePolicy(nn.Module):
    def __init__(self, space: KnobSpace, d_model: int, budget_dim: int = 256, hidden: int = 256,
                 budget_token: bool = False, image_size: bool = False, token_counts: bool = False):
        super().__init__()
        self.space = space
        # controller.token_counts: stage 2's latency token carries the request's vision and text token
        # counts (token_count_features) after its d_model features: the cost of what is left to run
        self.n_counts = TOKEN_COUNT_FEATURES if token_counts else 0
        # controller.image_size: stage 1 also reads the image's size (image_size_features), known
        # before the vision encoder runs; inputs of the same question then cost different vision tokens
        self.n_input = IMAGE_SIZE_FEATURES if image_size else 0
        self.budget = BudgetEncoding(budget_dim)
        # controller.budget_token: the budget as one more input token, whose hidden state after
        # block p-1 is stage 2's latency token (KnobHooks.probe), so blocks [0, p) read the image and
        # question for this budget; otherwise the latency token is the prompt's last token
        self.budget_token = nn.Linear(budget_dim, d_model) if budget_token else None
        # insertion logits per tier: the best p depends on the tier (at a tight budget only p=1,
        # which allows the fewest blocks, fits the medium tier, while any p fits the low one)
        self.stage1 = mlp(d_model + self.n_input + budget_dim, hidden, len(space.tiers) * (1 + len(space.insertions)))
        # stage 2 sees stage 1's decision (tier, p) as an embedding: the latency token hardly encodes
        # the tier (nearest-centroid accuracy 36-41% over 3 tiers, test split), yet the top_k and
        # num_blocks that fit a budget depend on it
        self.n_tier, self.n_ins = len(space.tiers), len(space.insertions)
        self.decision_embed = nn.Embedding(self.n_tier * self.n_ins, 32)
        # num_blocks logits per top_k: with independent heads, k6 n12 (the best fit at a tight budget)
        # loses to k4 n13, since k6 looks late while num_blocks still samples n13 and n12 looks worse
        # while top_k still samples k4; three seeds settled on k4 (-1.9 points at 15 ms)
        self.n_topk, self.n_blocks = len(space.top_ks), space.max_block_options
        self.stage2 = mlp(d_model + self.n_counts + budget_dim + 32, hidden, self.n_topk * (1 + self.n_blocks))

    def budget_query(self, budget_ms: torch.Tensor) -> torch.Tensor:
        """The budget token's input embedding, (B, 1, d_model)."""
        return self.budget_token(self.budget(budget_ms))[:, None]

    # ---- logits ------------------------------------------------------------------------
    def stage1_logits(self, lang: torch.Tensor, budget_feat: torch.Tensor):
        """lang: the question feature (B, d_model), then the image's size features when the policy reads
        them (B, d_model + n_input). -> tier logits (B, tiers) and insertion logits per tier (B, tiers, P)."""
        out = self.stage1(torch.cat([lang, budget_feat], dim=-1))
        return out[:, : self.n_tier], out[:, self.n_tier:].reshape(len(out), self.n_tier, -1)

    def stage2_logits(self, latency_token: torch.Tensor, budget_feat: torch.Tensor, tier_idx: torch.Tensor,
                      insertion_idx: torch.Tensor):
        """-> top_k logits (B, K) and num_blocks logits per top_k (B, K, N), invalid options masked."""
        x = torch.cat([latency_token, budget_feat, self.decision_embed(tier_idx * self.n_ins + insertion_idx)], dim=-1)
        out = self.stage2(x)
        ins = torch.tensor(self.space.insertions, device=insertion_idx.device)[insertion_idx]
        mask = self.space.num_blocks_mask(ins)[:, None]
        blocks = out[:, self.n_topk:].reshape(len(out), self.n_topk, self.n_blocks)
        # a large finite negative, not -inf: probability exactly 0, and no 0 * inf = NaN in gradients
        return out[:, : self.n_topk], blocks.masked_fill(~mask, MASKED)

    # ---- distributions -----------------------------------------------------------------
    def stage1_dists(self, lang, budget_feat):
        """The tier's distribution and a function tier -> the insertion's distribution at that tier."""
        tier, ins = self.stage1_logits(lang, budget_feat)
        return Categorical(logits=tier), given(ins)

    def stage2_dists(self, latency_token, budget_feat, tier_idx, insertion_idx):
        """top_k's distribution and a function top_k -> num_blocks' distribution at that top_k."""
        topk, blocks = self.stage2_logits(latency_token, budget_feat, tier_idx, insertion_idx)
        return Categorical(logits=topk), given(blocks)

    def log_prob_and_entropy(self, lang, latency_tokens, budget_ms, decision: Decision, heads=HEADS):
        """Sum of the log-probabilities of `heads` (default: all four) and every head's entropy.

        latency_tokens: (B, tiers, P, d), the token after each insertion at each tier (rows vary in both),
        with the token counts appended when the policy reads them (d = d_model + n_counts).
        """
        feat = self.budget(budget_ms)
        d_tier, ins_given = self.stage1_dists(lang, feat)
        d_ins = ins_given(decision.tier)
        tok = latency_tokens[torch.arange(len(decision.insertion)), decision.tier, decision.insertion]
        d_topk, blocks_given = self.stage2_dists(tok, feat, decision.tier, decision.insertion)
        d_blocks = blocks_given(decision.top_k)
        dists = {"tier": d_tier, "insertion": d_ins, "top_k": d_topk, "num_blocks": d_blocks}
        logp = sum(dists[h].log_prob(getattr(decision, h)) for h in heads)
        return logp, {h: d.entropy() for h, d in dists.items()}

    @torch.no_grad()
    def act(self, lang, latency_tokens, budget_ms, greedy: bool = False, uniform_stage1: bool = False,
            fits: torch.Tensor | None = None) -> Decision:
        """Sample (or argmax) a decision per row; latency_tokens (B, tiers, P, d) as above.

        uniform_stage1: draw (tier, p) uniformly instead (stage-2 warm-up), stage 2 from the policy.
        fits: (B, tiers, P, K, N) bool, the configurations each row may choose (fitting(...)): every
        head's options that lead to none are masked.
        """
        feat = self.budget(budget_ms)
        tier_logits, ins_logits = self.stage1_logits(lang, feat)
        rows = torch.arange(len(lang), device=lang.device)
        if fits is not None:
            tier_logits = tier_logits.masked_fill(~fits.flatten(2).any(-1), MASKED)
            ins_logits = ins_logits.masked_fill(~fits.flatten(3).any(-1), MASKED)
        pick = (lambda d: d.probs.argmax(-1)) if greedy else (lambda d: d.sample())
        if uniform_stage1:
            tier = pick(Categorical(logits=torch.zeros_like(tier_logits)))
            ins = pick(Categorical(logits=lang.new_zeros(len(lang), len(self.space.insertions))))
        else:
            tier = pick(Categorical(logits=tier_logits))
            ins = pick(Categorical(logits=ins_logits[rows, tier]))
        tok = latency_tokens[rows, tier, ins]
        topk_logits, blocks_logits = self.stage2_logits(tok, feat, tier, ins)
        if fits is not None:
            ok = fits[rows, tier, ins]  # (B, K, N)
            topk_logits = topk_logits.masked_fill(~ok.any(-1), MASKED)
            blocks_logits = blocks_logits.masked_fill(~ok, MASKED)
        top_k = pick(Categorical(logits=topk_logits))
        return Decision(tier, ins, top_k, pick(Categorical(logits=blocks_logits[rows, top_k])))


def fitting(p95_ms: torch.Tensor, budget_ms: torch.Tensor) -> torch.Tensor:
    """The argmax guard: (B, tiers, P, K, N) bool, the configurations whose profiled 95th-percentile
    latency p95_ms (tiers, P, K, N, or (B, tiers, P, K, N) per row's input group; NaN where invalid)
    fits each row's budget, or the fastest one
    where none does. A policy's argmax at a budget it was rarely trained at (the feasible range's low
    edge, or below it once calibration has tightened the budget) can be any configuration; with the
    guard it is never one the profile says runs late when one that keeps the budget exists."""
    lat = p95_ms.nan_to_num(float("inf"))
    lat = lat if lat.dim() == 5 else lat[None]
    fits = lat <= budget_ms.to(lat)[:, None, None, None, None]
    fastest = lat == lat.flatten(1).min(-1).values[:, None, None, None, None]
    return torch.where(fits.flatten(1).any(-1)[:, None, None, None, None], fits, fastest)
