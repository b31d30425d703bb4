"""The rollout engine: many (sample, configuration) pairs at once, sharing the work configurations
have in common, with the answers batch-1 `Backbone.generate` gives (issue 18).

Every configuration of a sample at one tier sees the same preprocessed prompt and vision features,
and runs blocks [0, p) at the default top_k before its insertion point p. So, per tier and batch
of samples: the processor and the vision encoder once; one prefill through blocks [0, max p] that
keeps each block's keys and values and the hidden states entering every insertion point. Then the
pairs themselves are the batch, one row each, whatever their configurations: per insertion point,
one continuation of the prefill from block p on its pairs' rows, each row skipping the blocks its
configuration leaves out and routing to its own top_k (`KnobHooks.per_row`), with a KV cache of its
own (numbered from 0, so that the prefix's length moves neither its mask nor its positions: it sees
the prompt as the whole prefill would); then one cache for all of them (the prefix's layers [0, p)
and the continuation's after it, per row) and one greedy decode, batched as `generate`'s is, a row
ending at its end of turn. A configuration's rows thus never wait for enough samples at that same
configuration: GRPO's groups, a few samples per configuration, batch as well as a profile does.

A family whose decoder needs more than hidden states, mask and positions to continue says so
(`Family.continuation_kwargs`: Qwen3-VL's deepstack features); one that cannot continue has each
configuration run whole, batched over its samples (`generate`). Timing stays with `generate` at
batch 1: rollouts give answers and token counts; latency comes from the latency model or a
measurement.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import DynamicCache

from lvlm_ctrl.backbone import Backbone, Generation
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


class RolloutEngine:
    def __init__(self, backbone: Backbone, batch_size: int = 64, max_rows: int = 1024):
        # batch_size samples share a prefill; max_rows (sample, configuration) pairs share a decode
        self.backbone, self.batch_size, self.max_rows = backbone, batch_size, max_rows

    @torch.inference_mode()
    def run(self, images: list, questions: list[str], configs: list[list[Knobs]],
            max_new_tokens: int | None = None) -> dict[tuple[int, Knobs], tuple[Generation, int]]:
        """Sample i at each configuration of configs[i] (repeats run once) -> {(i, knobs): (the
        Generation of the batch that ran it, its row there)}; answers and token counts only."""
        bb = self.backbone
        max_new = max_new_tokens or bb.max_new_tokens
        wanted: dict[str, dict[int, set[Knobs]]] = defaultdict(lambda: defaultdict(set))
        for i, ks in enumerate(configs):
            for k in ks:
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
                for gen, rows in gens:
                    out.update({(chunk[r], gen.knobs): (gen, j) for j, r in enumerate(rows)})
        return out

    def _whole(self, images, questions, chunk, pairs, max_new):
        """Each configuration run whole on its samples (a family that cannot continue a prefill)."""
        runs: dict[Knobs, list[int]] = defaultdict(list)
        for row, k in pairs:
            runs[k].append(row)
        return [(self.backbone.generate([images[chunk[r]] for r in rows], [questions[chunk[r]] for r in rows], k,
                                        max_new_tokens=max_new), rows) for k, rows in runs.items()]

    def _rows(self, prompt, prefix: Prefix, pairs: list[tuple[int, Knobs]], max_new: int):
        """`pairs` ((row of the prompt batch, configuration), by insertion point) as one batch: per
        insertion point a continuation of the prefix on its pairs' rows, then one decode of all.
        -> [(Generation of a configuration, the prompt rows it ran on)]."""
        bb, hooks = self.backbone, self.backbone.hooks
        n, dev = hooks.num_layers, bb.device
        kept = {k: set(hooks.kept_blocks(k.insertion, k.num_blocks)) for k in {k for _, k in pairs}}
        by_p: dict[int, list[tuple[int, Knobs]]] = defaultdict(list)
        for row, k in pairs:
            by_p[k.insertion].append((row, k))
        last, layers = [], [([], []) for _ in range(n)]
        order = [pair for group in by_p.values() for pair in group]
        for p, group in by_p.items():
            rows = torch.tensor([r for r, _ in group], device=dev)
            blocks = list(range(p, n))
            keep = torch.tensor([[b in kept[k] for b in blocks] for _, k in group], device=dev)
            top_k = torch.tensor([[k.top_k] * len(blocks) for _, k in group], device=dev)
            own = DynamicCache()
            with hooks.per_row(blocks, keep, top_k, continuation=True):
                normed = hooks.decoder(inputs_embeds=prefix.entering[p][rows], attention_mask=prompt.attention_mask[rows],
                                       position_ids=prompt.position_ids[..., rows, :], cache=own, use_cache=True,
                                       **bb.family.continuation_kwargs(prefix.decoder_kwargs, p, rows)).last_hidden_state
            last.append(normed[:, -1:])
            for b in range(n):
                if b < p:
                    keys, values = prefix.cache.layers[b].keys[rows], prefix.cache.layers[b].values[rows]
                else:
                    keys, values = self._layer(own, b - p, prefix.cache.layers[0], len(group))
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
        with hooks.per_row(list(range(n)), keep, top_k):
            out_ids = bb.greedy(logits, prompt.attention_mask[rows], prompt.position_ids[..., rows, :],
                                bb.cached_step(cache), max_new)
        token_ids, answers, n_out = bb.answers(out_ids)
        at: dict[Knobs, list[int]] = defaultdict(list)
        for j, (_, k) in enumerate(order):
            at[k].append(j)
        return [(Generation([answers[j] for j in js], [n_out[j] for j in js],
                            [prompt.vision_tokens[order[j][0]] for j in js], [prompt.text_tokens[order[j][0]] for j in js],
                            token_ids=[token_ids[j] for j in js], knobs=k), [order[j][0] for j in js])
                for k, js in at.items()]

    @staticmethod
    def _layer(cache: DynamicCache, i: int, like, rows: int):
        """Layer i's keys and values of a continuation's cache; zeros shaped as the prefix's where
        none of its rows ran that block (its rows skip it in decoding too, so nothing reads them)."""
        if i < len(cache.layers) and getattr(cache.layers[i], "keys", None) is not None \
                and cache.layers[i].keys.numel():
            return cache.layers[i].keys, cache.layers[i].values
        return (like.keys.new_zeros((rows, *like.keys.shape[1:])), like.values.new_zeros((rows, *like.values.shape[1:])))
