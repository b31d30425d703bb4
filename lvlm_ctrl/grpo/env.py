"""The training environment: what a sampled configuration scores, read from an offline profile.

Every (sample, configuration) of the profiled split was already run, so a rollout is a batched
table lookup: accuracy from the recorded answer, latency measured (or predicted by the latency
model with the request's token counts). The stage inputs come from the backbone itself: the
language feature (its tokenizer and input embeddings, mean-pooled) and the latency token after
every insertion point at every tier (one full-model prefill per sample and tier: blocks [0, p) run
at the default top_k whatever is decided later, so these are the tokens serving would see).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from transformers import DynamicCache

from lvlm_ctrl.errors import UserError
from lvlm_ctrl.grpo.policy import Decision
from lvlm_ctrl.knobs import Knobs, KnobSpace
from lvlm_ctrl.profiling import KNOB_COLUMNS, robust_quantile


def table_shape(space: KnobSpace, num_samples: int) -> tuple[int, ...]:
    """(S, tiers, P, K, N): a table over samples and the configurations of the space."""
    return (num_samples, len(space.tiers), len(space.insertions), len(space.top_ks), space.max_block_options)


def check_space(df: pd.DataFrame, space: KnobSpace) -> None:
    """Every configuration of the records is one of the space's, or a one-line error: another
    backbone's or knob space's records must never be indexed into its tables."""
    for tier, p, k, n in df[KNOB_COLUMNS].drop_duplicates().itertuples(index=False):
        try:
            space.validate(Knobs(str(tier), int(p), int(k), int(n)))
        except UserError as err:
            raise UserError(f"profile holds a configuration outside this backbone's knob space ({err}); "
                            "profile this backbone (python -m lvlm_ctrl.profile)") from None


def table_index(space: KnobSpace, df: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """The (tier, p, top_k, num_blocks) table indices of each record of df."""
    tiers = {t: i for i, t in enumerate(space.tiers)}
    return (df["tier"].map(tiers).to_numpy(), np.array([space.insertions.index(int(p)) for p in df["insertion"]]),
            np.array([space.top_ks.index(int(k)) for k in df["top_k"]]),
            df["num_blocks"].to_numpy(int) - (df["insertion"].to_numpy(int) + space.min_kept_after))


class ProfileEnv:
    def __init__(self, df: pd.DataFrame, space: KnobSpace, latency_model=None):
        if df.empty:
            raise UserError("the GRPO environment needs a non-empty profile (profile.path)")
        sample_ids = sorted(df["sample_id"].astype(str).unique())
        index = {s: i for i, s in enumerate(sample_ids)}
        shape = table_shape(space, len(sample_ids))
        accuracy, latency = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
        lat = df["T_total_ms"].to_numpy(float) if latency_model is None else latency_model.predict_frame(df)
        check_space(df, space)
        cells = (df["sample_id"].astype(str).map(index).to_numpy(), *table_index(space, df))
        accuracy[cells] = torch.tensor(df["accuracy"].to_numpy(float), dtype=torch.float32)
        latency[cells] = torch.tensor(lat, dtype=torch.float32)
        # (S, tiers, 2): each sample's vision and text token count at each tier (as the profile encoded it)
        token_counts = torch.zeros(len(sample_ids), len(space.tiers), 2)
        if {"vision_tokens", "text_tokens"} <= set(df.columns):
            first = df.drop_duplicates(["sample_id", "tier"])
            token_counts[first["sample_id"].astype(str).map(index).to_numpy(), first["tier"].map(
                {t: i for i, t in enumerate(space.tiers)}).to_numpy()] = \
                torch.tensor(first[["vision_tokens", "text_tokens"]].to_numpy(float), dtype=torch.float32)
        self._init_tables(space, sample_ids, accuracy, latency, token_counts)

    def _init_tables(self, space: KnobSpace, sample_ids: list[str], accuracy: torch.Tensor, latency: torch.Tensor,
                     token_counts: torch.Tensor) -> None:
        """accuracy and latency: (S, tiers, P, K, N), NaN where not known or not valid."""
        self.space, self.sample_ids = space, sample_ids
        self.accuracy, self.latency, self.token_counts = accuracy, latency, token_counts
        # the feasible range as the lookup table sees it: the fastest and the slowest configuration's
        # 95th-percentile latency (rows a disturbance slowed left out), so both default to the same budgets
        q95 = self._q95(torch.arange(len(self.sample_ids)))
        self.p95 = torch.tensor(q95, dtype=torch.float32).reshape(latency.shape[1:])  # NaN where invalid
        self.feasible = (float(np.nanmin(q95)), float(np.nanmax(q95)))
        self.tier_cost = torch.arange(1, len(space.tiers) + 1, dtype=torch.float32) / len(space.tiers)
        self.set_groups(None)
        self.use_for_slo(torch.arange(len(self.sample_ids)))

    def set_groups(self, groups: list[str] | None, min_samples: int = 20) -> None:
        """Input groups (one name per sample, e.g. the image's size class; None = one group) whose
        latency statistics are kept apart: a row's SLO miss rate and its guard's p95 (`group_p95`,
        (G, tiers, P, K, N)) come from the samples of its group, or from all samples for a group of
        fewer than `min_samples`. On inputs that differ in cost, a configuration that keeps a budget
        on small images may not on large ones."""
        names = sorted(set(groups)) if groups is not None else ["all"]
        self._groups, self.group_names = groups, names
        self.group_of = torch.tensor([names.index(g) for g in groups] if groups is not None else
                                     [0] * len(self.sample_ids))
        self.min_group = min_samples
        self.group_p95 = torch.stack([
            torch.tensor(self._q95(self._group_rows(g, torch.arange(len(self.sample_ids)))),
                         dtype=torch.float32).reshape(self.p95.shape) for g in range(len(names))])
        if hasattr(self, "_slo_rows"):
            self.use_for_slo(self._slo_rows)

    def refresh(self) -> None:
        """Recompute the latency statistics (p95, per group, the SLO's sorted latencies) after the
        latency table changed; the feasible range, which the budgets are bound to, stays."""
        self.p95 = torch.tensor(self._q95(torch.arange(len(self.sample_ids))), dtype=torch.float32).reshape(self.p95.shape)
        self.set_groups(self._groups, self.min_group)

    def metrics(self) -> dict[str, float]:
        """What the environment itself reports to the logger (the online one: its rollouts)."""
        return {}

    def report(self) -> dict:
        """What it reports at the end of training (the online one: online_env.json)."""
        return {}

    def _group_rows(self, g: int, rows: torch.Tensor) -> torch.Tensor:
        mine = rows[self.group_of[rows] == g]
        return mine if len(mine) >= self.min_group else rows

    def _q95(self, rows: torch.Tensor) -> list[float]:
        """Each configuration's 95th-percentile latency over samples `rows`, flat (rows a disturbance
        slowed left out: profiling.robust_quantile)."""
        return [robust_quantile(col, 0.95) for col in self.latency[rows].reshape(len(rows), -1).T.numpy()]

    def use_for_slo(self, rows: torch.Tensor) -> None:
        """The samples a configuration's miss rate is counted on (the training split, not validation),
        per group: (G, tiers, P, K, N, S) sorted to count by bisection, padded with inf."""
        self._slo_rows = rows
        per_group = [self._group_rows(g, rows) for g in range(len(self.group_names))]
        width = max(len(r) for r in per_group)
        sorted_lat = torch.full((len(per_group), *self.p95.shape, width), float("inf"))
        for g, r in enumerate(per_group):
            lat = self.latency[r].movedim(0, -1).nan_to_num(float("inf"))
            sorted_lat[g, ..., :len(r)] = lat.sort(dim=-1).values
        self._sorted_latency = sorted_lat
        self._slo_count = torch.tensor([len(r) for r in per_group], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def outcome(self, sample_idx: torch.Tensor, d: Decision) -> tuple[torch.Tensor, torch.Tensor]:
        acc = self.accuracy[sample_idx, d.tier, d.insertion, d.top_k, d.num_blocks]
        lat = self.latency[sample_idx, d.tier, d.insertion, d.top_k, d.num_blocks]
        if torch.isnan(acc).any() or torch.isnan(lat).any():
            raise UserError("a sampled configuration is missing from the profile: profile every configuration "
                            "of the training samples (python -m lvlm_ctrl.profile)")
        return acc, lat

    def miss_rate(self, d: Decision, budget: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
        """Per row: the fraction of the SLO samples of its group on which the row's configuration runs
        over the row's budget: the population statistic the lookup table decides by (its q95 latency)."""
        g = self.group_of[sample_idx]
        lat = self._sorted_latency[g, d.tier, d.insertion, d.top_k, d.num_blocks]  # (B, S)
        within = torch.searchsorted(lat, budget.float()[:, None].contiguous(), right=True)[:, 0]
        return 1.0 - within.float() / self._slo_count[g]

    def complexity(self, d: Decision) -> torch.Tensor:
        """Relative cost in [0, 1]: tier x top_k x active blocks, normalised by the full model."""
        s = self.space
        top_k = torch.tensor(s.top_ks, dtype=torch.float32)[d.top_k] / max(s.top_ks)
        ins = torch.tensor(s.insertions)[d.insertion]
        blocks = (ins + s.min_kept_after + d.num_blocks).float() / s.num_layers
        return self.tier_cost[d.tier] * top_k * blocks


@torch.inference_mode()
def language_features(backbone, questions: list[str]) -> torch.Tensor:
    """Stage 1's input: the backbone's own tokenizer and input embeddings, mean-pooled (no copy)."""
    emb = backbone.model.get_input_embeddings()
    tok = backbone.tokenizer(questions, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = tok["input_ids"].to(backbone.device), tok["attention_mask"].to(backbone.device).float()
    vecs = emb(ids) * mask[..., None]
    return (vecs.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).float().cpu()


@torch.inference_mode()
def latency_tokens(backbone, samples, batch_size: int = 64) -> torch.Tensor:
    """(S, tiers, P, d): hidden state of the last token after block p-1, per tier and insertion."""
    space = backbone.space
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images, questions = [s.load_image() for s in chunk], [s.question for s in chunk]
        per_tier = []
        for tier in space.tiers:
            prompt = backbone.encode(images, questions, tier)
            # the blocks after max p do not matter; block max p runs so that the last hidden state, which the
            # model hands back after its final norm, is not one of those read
            with backbone.hooks.run_blocks(list(range(max(space.insertions) + 1))):
                hs = backbone.prefill(prompt, backbone.vision(prompt), output_hidden_states=True,
                                      logits_to_keep=1).hidden_states
            per_tier.append(torch.stack([hs[p][:, -1] for p in space.insertions], dim=1))
        out.append(torch.stack(per_tier, dim=1).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def prompt_states(backbone, samples, batch_size: int = 64) -> list[tuple[torch.Tensor, ...]]:
    """Per tier: the prompt's keys and values in blocks [0, max p) ((S, max p, heads, L, head_dim)
    each, left-padded to the tier's longest prompt), its attention mask (S, L) and the position of
    the token after it ((S, 1), or (rows, S, 1) for multimodal rope). With these, the budget token's
    latency token (budget_token_latency_tokens) costs max p blocks of one token."""
    space, hooks = backbone.space, backbone.hooks
    last = max(space.insertions)
    out = []
    for tier in space.tiers:
        keys, values, masks, positions = [], [], [], []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            prompt = backbone.encode([s.load_image() for s in chunk], [s.question for s in chunk], tier)
            cache = DynamicCache(config=backbone.model.config.get_text_config())
            with hooks.run_blocks(list(range(last))):
                backbone.prefill(prompt, backbone.vision(prompt), cache=cache, use_cache=True, logits_to_keep=1)
            keys.append(torch.stack([cache.layers[i].keys for i in range(last)], dim=1).cpu())
            values.append(torch.stack([cache.layers[i].values for i in range(last)], dim=1).cpu())
            masks.append(prompt.attention_mask.cpu())
            positions.append(prompt.next_position.cpu())
        length = max(m.shape[1] for m in masks)
        out.append((torch.cat([_left_pad(k, length, -2) for k in keys]),
                    torch.cat([_left_pad(v, length, -2) for v in values]),
                    torch.cat([_left_pad(m, length, -1) for m in masks]),
                    torch.cat(positions, dim=-2)))
    return out


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    pad = [0, 0] * (-dim - 1) + [length - t.shape[dim], 0]
    return torch.nn.functional.pad(t, pad)


def budget_token_latency_tokens(backbone, query: torch.Tensor, states, rows: torch.Tensor) -> torch.Tensor:
    """(B, tiers, P, d): the budget token `query` (B, 1, d) run behind each row's prompt at every
    tier; differentiable in `query` (the backbone stays frozen)."""
    insertions = list(backbone.space.insertions)
    dtype, per_tier = backbone.model.dtype, []
    for keys, values, mask, position in states:
        k, v = (t[rows].to(query.device, dtype) for t in (keys, values))
        per_tier.append(backbone.hooks.probe(query.to(dtype), list(k.unbind(1)), list(v.unbind(1)),
                                             mask[rows].to(query.device), position[..., rows, :].to(query.device),
                                             insertions).float())
    return torch.stack(per_tier, dim=1)
