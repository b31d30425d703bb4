"""The rollout engine: many (sample, configuration) pairs at once, sharing the work configurations
have in common, with the answers batch-1 `Backbone.generate` gives (issue 18).

Every configuration of a sample at one tier sees the same preprocessed prompt and vision features,
and runs blocks [0, p) at the default top_k before its insertion point p. So, per tier and batch
of samples: the processor and the vision encoder once; one prefill through blocks [0, max p] that
keeps each block's keys and values and the hidden states entering every insertion point. Then the
pairs themselves are the batch, one row each, whatever their configurations: a continuation of the
prefill per insertion point (those with few rows merged into one from the smallest, each row
starting from the hidden states entering its own p and passing the blocks before it), skipping the blocks its configuration leaves out and
routing to its own top_k (`KnobHooks.per_row`), with a KV cache of its own (numbered from its first
block, so that the prefix's length moves neither its mask nor its positions: it sees the prompt as
the whole prefill would); then one cache for all of them (per row, the prefix's layers before its p
and the continuation's after) and one greedy decode, batched as `generate`'s is, a row leaving the
batch at its end of turn. (Where what the decoder takes beside hidden states changes with p, as
Qwen3-VL's deepstack features before block 3 do, each such p continues alone.) Rows of one sample
and p at one top_k hold equal states until their kept lists part, and a continuation runs each block
once per set of equal rows (`shared_rows`): a profile's configurations that differ only in the
blocks they skip share the blocks before the first difference. A configuration's rows thus never
wait for enough samples at that same configuration: GRPO's groups, a few samples per
configuration, batch as well as a profile does.

A family whose decoder needs more than hidden states, mask and positions to continue says so
(`Family.continuation_kwargs`: Qwen3-VL's deepstack features); one that cannot continue has each
configuration run whole, batched over its samples (`generate`). Timing stays with `generate` at
batch 1: rollouts give answers and token counts; latency comes from the latency model or a
measurement. The experts run the engine's own kernel (backbone/experts.py), which skips the
zero-weight picks that pad each row's routing to the widest top_k.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lvlm_ctrl.backbone import Backbone, Generation, experts_implementation
from lvlm_ctrl.backbone.experts import NAME as EXPERTS_KERNEL
from lvlm_ctrl.backbone.hooks import shared_rows
from lvlm_ctrl.knobs import Knobs


class Prefix:
    """One prefill through blocks [0, max p] of a batch at one tier: each block's keys and values,
    the hidden states entering each insertion point, and what the model passed its decoder."""

    def __init__(self, backbone: Backbone, prompt, vision, insertions: list[int]):
        hooks, decoder = backbone.hooks, backbone.hooks.decoder
        self.entering: dict[int, torch.Tensor] = {}
        self.decoder_kwargs: dict = {}

        def entering(p):
            def hook(_module, args, kwargs):
                self.entering[p] = args[0] if args else kwargs["hidden_states"]
            return hook

        def passed(_module, _args, kwargs):
            self.decoder_kwargs = dict(kwargs)

        # block max p runs too, so the states entering it (after block p-1 and anything the decoder
        # adds there, e.g. deepstack features) are the ones its forward hands on
        last = max(insertions)
        handles = [hooks.blocks[p].register_forward_pre_hook(entering(p), with_kwargs=True) for p in insertions]
        handles.append(decoder.register_forward_pre_hook(passed, with_kwargs=True))
        self.cache = DynamicCache()
        try:
            with hooks.run_blocks(list(range(last + 1))):
                backbone.prefill(prompt, vision, cache=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()


@dataclass(frozen=True)
class Blocks:
    """A configuration whose kept blocks are given (importance's "every block but i") rather than
    chosen by num_blocks and the ranking; the engine runs it as it runs a configuration. `kept`
    holds blocks [0, p) and the pinned ones."""

    knobs: Knobs
    kept: tuple[int, ...]

    tier = property(lambda self: self.knobs.tier)
    insertion = property(lambda self: self.knobs.insertion)
    top_k = property(lambda self: self.knobs.top_k)
    num_blocks = property(lambda self: len(self.kept))


class RolloutEngine:
    def __init__(self, backbone: Backbone, batch_size: int = 64, max_rows: int = 1024, merge_below: int = 128):
        # batch_size samples share a prefill; max_rows (sample, configuration) pairs share a decode;
        # an insertion point with fewer than merge_below of them shares another's continuation
        self.backbone, self.batch_size, self.max_rows, self.merge_below = backbone, batch_size, max_rows, merge_below

    @torch.inference_mode()
    def run(self, images: list, questions: list[str], configs: list[list[Knobs]],
            max_new_tokens: int | None = None) -> dict[tuple[int, Knobs], tuple[Generation, int]]:
        """Sample i at each configuration of configs[i] (Knobs, or Blocks; repeats run once) ->
        {(i, configuration): (the Generation of the batch that ran it, its row there)}; answers and
        token counts only."""
        with experts_implementation(self.backbone.model, EXPERTS_KERNEL):  # backbone/experts.py
            return self._run(images, questions, configs, max_new_tokens or self.backbone.max_new_tokens)

    def _run(self, images, questions, configs, max_new: int):
        bb = self.backbone
        wanted: dict[str, dict[int, set[Knobs]]] = defaultdict(lambda: defaultdict(set))
        for i, ks in enumerate(configs):
            for k in ks:
                if isinstance(k, Blocks):
                    bb.space.validate(k.knobs)
                    if not set(range(k.insertion)) | set(bb.hooks.pinned) <= set(k.kept):
                        raise ValueError(f"{k}: blocks [0, p) and the pinned ones must be kept")
                else:
                    bb.space.validate(k)
                wanted[k.tier][i].add(k)
        out = {}
        for tier in bb.space.tiers:
            samples = sorted(wanted[tier])
            for start in range(0, len(samples), self.batch_size):
                chunk = samples[start:start + self.batch_size]
                pairs = sorted(((row, k) for row, i in enumerate(chunk) for k in wanted[tier][i]),
                               key=lambda rk: (rk[1].insertion, rk[0], rk[1].top_k, rk[1].num_blocks))
                prompt = bb.encode([images[i] for i in chunk], [questions[i] for i in chunk], tier)
                vision = bb.vision(prompt)
                prefix = Prefix(bb, prompt, vision, sorted({k.insertion for _, k in pairs}))
                everyone = torch.arange(len(chunk), device=bb.device)
                if bb.family.continuation_kwargs(prefix.decoder_kwargs, pairs[0][1].insertion, everyone) is None:
                    gens = self._whole(images, questions, chunk, pairs, max_new)
                else:
                    gens = [g for s in range(0, len(pairs), self.max_rows)
                            for g in self._rows(prompt, prefix, pairs[s:s + self.max_rows], max_new)]
                for key, (gen, rows) in gens:
                    out.update({(chunk[r], key): (gen, j) for j, r in enumerate(rows)})
        return out

    def _whole(self, images, questions, chunk, pairs, max_new):
        """Each configuration run whole on its samples (a family that cannot continue a prefill)."""
        runs: dict[Knobs, list[int]] = defaultdict(list)
        for row, k in pairs:
            runs[k].append(row)
        bb = self.backbone
        return [(k, (bb.generate([images[chunk[r]] for r in rows], [questions[chunk[r]] for r in rows],
                                 _knobs(k), max_new_tokens=max_new,
                                 kept=list(k.kept) if isinstance(k, Blocks) else None), rows))
                for k, rows in runs.items()]

    def _rows(self, prompt, prefix: Prefix, pairs: list[tuple[int, Knobs]], max_new: int):
        """`pairs` ((row of the prompt batch, configuration), by insertion point) as one batch: a
        continuation of the prefix on their rows per start (`_starts`), then one decode of all.
        -> [(configuration, (its Generation, the prompt rows it ran on))]."""
        bb, hooks = self.backbone, self.backbone.hooks
        n, dev = hooks.num_layers, bb.device
        kept = {k: set(k.kept) if isinstance(k, Blocks) else set(hooks.kept_blocks(k.insertion, k.num_blocks))
                for k in {k for _, k in pairs}}  # a configuration's blocks: given, or num_blocks of the ranking
        start = self._starts(prefix, Counter(k.insertion for _, k in pairs))
        by_start: dict[int, list[tuple[int, Knobs]]] = defaultdict(list)
        for row, k in pairs:
            by_start[start[k.insertion]].append((row, k))
        last, layers = [], [([], []) for _ in range(n)]
        order = [pair for group in by_start.values() for pair in group]
        for s, group in by_start.items():
            rows = torch.tensor([r for r, _ in group], device=dev)
            p = torch.tensor([k.insertion for _, k in group], device=dev)
            blocks = list(range(s, n))
            # a row from a later insertion point passes the blocks before it, its hidden states
            # those entering its own p
            keep = torch.tensor([[k.insertion <= b and b in kept[k] for b in blocks] for _, k in group], device=dev)
            top_k = torch.tensor([[k.top_k] * len(blocks) for _, k in group], device=dev)
            hidden = prefix.entering[s][rows]
            for q in p.unique().tolist():
                if q != s:
                    hidden[p == q] = prefix.entering[q][rows[p == q]]
            # rows of one sample and p start alike; those that also share top_k share blocks until
            # their kept lists part (a profile's case: every configuration of every sample)
            shared = shared_rows(keep, top_k, torch.unique(torch.stack([rows, p], 1), dim=0, return_inverse=True)[1])
            own = DynamicCache()
            with hooks.per_row(blocks, keep, top_k, continuation=True, shared=shared):
                normed = hooks.decoder(inputs_embeds=hidden, attention_mask=prompt.attention_mask[rows],
                                       position_ids=prompt.position_ids[..., rows, :], cache=own, use_cache=True,
                                       **bb.family.continuation_kwargs(prefix.decoder_kwargs, s, rows)).last_hidden_state
            last.append(normed[:, -1:])
            for b in range(n):
                before = prefix.cache.layers[b] if b < len(prefix.cache.layers) else None
                if b < s:
                    keys, values = before.keys[rows], before.values[rows]
                else:
                    keys, values = self._layer(own, b - s, prefix.cache.layers[0], len(group))
                    if shared[b - s] is not None:  # the block ran on representatives: each row its own's
                        keys, values = keys[shared[b - s][1]], values[shared[b - s][1]]
                    if before is not None and bool((p > b).any()):  # blocks before a row's own p: the prefix's
                        mine = (p > b)[:, None, None, None]
                        keys, values = torch.where(mine, before.keys[rows], keys), torch.where(mine, before.values[rows], values)
                layers[b][0].append(keys)
                layers[b][1].append(values)
        cache = DynamicCache()
        for b, (keys, values) in enumerate(layers):
            cache.update(torch.cat(keys), torch.cat(values), b)
        rows = torch.tensor([r for r, _ in order], device=dev)
        keep = torch.tensor([[b in kept[k] for b in range(n)] for _, k in order], device=dev)
        # before p a configuration runs the default top_k (-1), from p on its own
        top_k = torch.tensor([[-1] * k.insertion + [k.top_k] * (n - k.insertion) for _, k in order], device=dev)
        logits = bb.model.get_output_embeddings()(torch.cat(last))
        with hooks.per_row(list(range(n)), keep, top_k) as select:
            def drop(stay):  # rows that have ended leave the batch: cache and per-row settings
                cache.batch_select_indices(stay)
                select(stay)
            out_ids = bb.greedy(logits, prompt.attention_mask[rows], prompt.position_ids[..., rows, :],
                                bb.cached_step(cache), max_new, select=drop)
        token_ids, answers, n_out = bb.answers(out_ids)
        at: dict[Knobs, list[int]] = defaultdict(list)
        for j, (_, k) in enumerate(order):
            at[k].append(j)
        return [(k, (Generation([answers[j] for j in js], [n_out[j] for j in js],
                                [prompt.vision_tokens[order[j][0]] for j in js], [prompt.text_tokens[order[j][0]] for j in js],
                                token_ids=[token_ids[j] for j in js], knobs=_knobs(k)),
                     [order[j][0] for j in js]))
                for k, js in at.items()]

    def _starts(self, prefix: Prefix, rows_at: dict[int, int]) -> dict[int, int]:
        """insertion point -> the block its rows' continuation starts at. An insertion point with
        few rows (under `merge_below`) joins the smallest one whose continuation takes the same
        inputs (its rows pass the blocks in between: attention runs on them for nothing, cheaper
        than one more pass for a few rows); one with many continues alone. Where the inputs differ
        with p (Qwen3-VL's deepstack features before block 3), each p continues alone."""
        bb = self.backbone
        insertions = sorted(rows_at)
        if all(rows_at[p] >= self.merge_below for p in insertions):  # nothing to merge: no inputs to compare
            return {p: p for p in insertions}
        rows = torch.arange(prefix.entering[insertions[0]].shape[0], device=bb.device)
        inputs = {p: bb.family.continuation_kwargs(prefix.decoder_kwargs, p, rows) for p in insertions}
        return {p: p if rows_at[p] >= self.merge_below else next(s for s in insertions if _same(inputs[s], inputs[p]))
                for p in insertions}

    @staticmethod
    def _layer(cache: DynamicCache, i: int, like, rows: int):
        """Layer i's keys and values of a continuation's cache; zeros shaped as the prefix's where
        none of its rows ran that block (its rows skip it in decoding too, so nothing reads them)."""
        if i < len(cache.layers) and getattr(cache.layers[i], "keys", None) is not None \
                and cache.layers[i].keys.numel():
            return cache.layers[i].keys, cache.layers[i].values
        return (like.keys.new_zeros((rows, *like.keys.shape[1:])), like.values.new_zeros((rows, *like.values.shape[1:])))


def _knobs(config: Knobs | Blocks) -> Knobs:
    """The knobs of a configuration (a Blocks' own, with its kept list aside)."""
    return config.knobs if isinstance(config, Blocks) else config


def _same(a, b) -> bool:
    """Whether two sets of forward inputs are equal (tensors by value)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b
