"""The rollout engine: many (sample, configuration) pairs at once, sharing the work configurations
have in common, with the answers batch-1 `Backbone.generate` gives (issue 18).

Every configuration of a sample at one tier sees the same preprocessed prompt and vision features,
and runs blocks [0, p) at the default top_k before its insertion point p. So, per tier and batch
of samples: the processor and the vision encoder once; one prefill through blocks [0, max p] that
keeps each block's keys and values and the hidden states entering every insertion point. Then per
configuration, batched over the samples that run it: its kept blocks after p continue from those
hidden states with a KV cache of their own (numbered from 0, so that the prefix's length moves
neither their mask nor their positions: they see the prompt as the whole prefill would), one cache
is assembled for decoding (the prefix's layers [0, p), then the continuation's), and greedy decode
runs as `generate`'s does, a row ending at its end of turn.

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
    def __init__(self, backbone: Backbone, batch_size: int = 32):
        self.backbone, self.batch_size = backbone, batch_size

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
                prompt = bb.encode([images[i] for i in chunk], [questions[i] for i in chunk], tier)
                vision = bb.vision(prompt)
                runs: dict[Knobs, list[int]] = defaultdict(list)  # configuration -> its rows in the chunk
                for row, i in enumerate(chunk):
                    for k in wanted[tier][i]:
                        runs[k].append(row)
                prefix = Prefix(bb, prompt, vision, sorted({k.insertion for k in runs}))
                for knobs in sorted(runs, key=lambda k: (k.insertion, k.top_k, k.num_blocks)):
                    rows = torch.tensor(runs[knobs], device=bb.device)
                    extra = bb.family.continuation_kwargs(prefix.decoder_kwargs, knobs.insertion, rows)
                    if extra is None:  # this family cannot continue: the configuration whole, on these rows
                        gen = bb.generate([images[chunk[r]] for r in runs[knobs]],
                                          [questions[chunk[r]] for r in runs[knobs]], knobs, max_new_tokens=max_new)
                    else:
                        gen = self._continue(prompt, prefix, knobs, rows, extra, max_new)
                    out.update({(chunk[r], knobs): (gen, j) for j, r in enumerate(runs[knobs])})
        return out

    def _continue(self, prompt, prefix: Prefix, knobs: Knobs, rows: torch.Tensor, extra: dict,
                  max_new: int) -> Generation:
        """Configuration `knobs` on batch rows `rows` from the shared prefix."""
        bb, p = self.backbone, knobs.insertion
        kept = bb.hooks.kept_blocks(p, knobs.num_blocks)
        mask, positions = prompt.attention_mask[rows], prompt.position_ids[..., rows, :]
        own = DynamicCache()
        with bb.hooks.run_blocks(kept[p:], knobs.top_k, p, continuation=True):
            hidden = bb.hooks.decoder(inputs_embeds=prefix.entering[p][rows], attention_mask=mask,
                                      position_ids=positions, cache=own, use_cache=True, **extra).last_hidden_state
        logits = bb.model.get_output_embeddings()(hidden[:, -1:])
        cache = DynamicCache()
        for i in range(p):
            layer = prefix.cache.layers[i]
            cache.update(layer.keys[rows], layer.values[rows], i)
        for j, layer in enumerate(own.layers):
            cache.update(layer.keys, layer.values, p + j)
        with bb.hooks.run_blocks(kept, knobs.top_k, p):
            out_ids = bb.greedy(logits, mask, positions, bb.cached_step(cache), max_new)
        return self._generation(prompt, rows, out_ids, knobs)

    def _generation(self, prompt, rows: torch.Tensor, out_ids: torch.Tensor, knobs: Knobs) -> Generation:
        token_ids, answers, n_out = self.backbone.answers(out_ids)
        r = rows.tolist()
        return Generation(answers, n_out, [prompt.vision_tokens[i] for i in r], [prompt.text_tokens[i] for i in r],
                          token_ids=token_ids, knobs=knobs)
