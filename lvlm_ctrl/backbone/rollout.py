"""The rollout engine: many (sample, configuration) pairs at once, sharing the work configurations
have in common, with the answers batch-1 `Backbone.generate` gives (issue 18).

Every configuration of a sample at one tier sees the same preprocessed prompt and vision features,
and runs blocks [0, p) at the default top_k before its insertion point p. So, per tier and batch
of samples: the processor and the vision encoder once; one prefill through blocks [0, max p] that
keeps each block's keys and values and the hidden states entering every insertion point. The kept
blocks after p of the configurations sharing p and top_k form a tree (the least important blocks are
the ones left out, so lists of different lengths agree up to the first block the longer one adds):
each segment continues once from the hidden states before it, on the samples of the configurations
below it, with a KV cache of its own (numbered from 0, so that the prefix's length moves neither
its mask nor its positions: it sees the prompt as the whole prefill would). Per configuration, one
cache is assembled for decoding (the prefix's layers [0, p), then its segments'), and greedy decode
runs as `generate`'s does, batched over its samples, a row ending at its end of turn.

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
                groups: dict[tuple[int, int], list[Knobs]] = defaultdict(list)  # (p, top_k) -> configurations
                for k in sorted(runs, key=lambda k: (k.insertion, k.top_k, k.num_blocks)):
                    groups[(k.insertion, k.top_k)].append(k)
                for (p, _), members in groups.items():
                    rows = {k: torch.tensor(runs[k], device=bb.device) for k in members}
                    union = torch.tensor(sorted({r for k in members for r in runs[k]}), device=bb.device)
                    if bb.family.continuation_kwargs(prefix.decoder_kwargs, p, union) is None:
                        # this family cannot continue: each configuration whole, on its rows
                        gens = {k: bb.generate([images[chunk[r]] for r in runs[k]], [questions[chunk[r]] for r in runs[k]],
                                               k, max_new_tokens=max_new) for k in members}
                    else:
                        gens = self._continue(prompt, prefix, members, rows, union, max_new)
                    for k, gen in gens.items():
                        out.update({(chunk[r], k): (gen, j) for j, r in enumerate(runs[k])})
        return out

    def _continue(self, prompt, prefix: Prefix, members: list[Knobs], rows: dict[Knobs, torch.Tensor],
                  union: torch.Tensor, max_new: int) -> dict[Knobs, Generation]:
        """Configurations sharing p and top_k, each on its batch rows (`union`: all of them,
        ascending), from the shared prefix. Their
        kept blocks after p form a tree (a configuration with more blocks shares every block up to
        the first one its list adds): each segment runs once, on the rows of the configurations
        below it, with a cache of its own; a configuration's cache is the prefix's layers [0, p),
        then its segments' layers."""
        bb = self.backbone
        p, top_k = members[0].insertion, members[0].top_k
        lists = {k: bb.hooks.kept_blocks(p, k.num_blocks) for k in members}
        out: dict[Knobs, Generation] = {}

        def grow(group: list[Knobs], depth: int, at: torch.Tensor, hidden, normed, layers: list):
            """`group`'s lists agree on their first `depth` blocks after p, already run: the hidden
            states after them (`hidden`, and `normed` as the decoder returns them) and each block's
            keys and values (`layers`), on batch rows `at`."""
            done = [k for k in group if len(lists[k]) == p + depth]
            for k in done:  # this configuration's blocks have all run: its answer
                pick = torch.searchsorted(at, rows[k])
                last = normed[pick] if normed is not None else bb.hooks.decoder.norm(hidden[pick])
                out[k] = self._answer(prompt, prefix, k, lists[k], rows[k], last,
                                      [(keys[pick], values[pick]) for keys, values in layers], max_new)
            by_next: dict[int, list[Knobs]] = defaultdict(list)
            for k in group:
                if k not in done:
                    by_next[lists[k][p + depth]].append(k)
            for branch in by_next.values():
                common = depth + 1  # the blocks every list of the branch has next, in the same order
                while all(len(lists[k]) > p + common and lists[k][p + common] == lists[branch[0]][p + common]
                          for k in branch):
                    common += 1
                segment = lists[branch[0]][p + depth:p + common]
                sub = torch.tensor(sorted({r for k in branch for r in rows[k].tolist()}), device=at.device)
                pick = torch.searchsorted(at, sub)
                h, h_normed, seg_layers = self._segment(prompt, prefix, segment, top_k, p, sub, hidden[pick])
                grow(branch, common, sub, h, h_normed,
                     [(keys[pick], values[pick]) for keys, values in layers] + seg_layers)

        grow(members, 0, union, prefix.entering[p][union], None, [])
        return out

    def _segment(self, prompt, prefix: Prefix, blocks: list[int], top_k: int, p: int, rows: torch.Tensor, hidden):
        """Blocks `blocks` (after p, top_k on them) on batch rows `rows` from `hidden`: -> the hidden
        states after the last one, before the decoder's final norm and after it, and each block's
        keys and values."""
        bb = self.backbone
        extra = bb.family.continuation_kwargs(prefix.decoder_kwargs, blocks[0], rows)
        after = {}
        hook = bb.hooks.blocks[blocks[-1]].register_forward_hook(
            lambda _m, _a, output: after.setdefault("h", output[0] if isinstance(output, tuple) else output))
        own = DynamicCache()
        try:
            with bb.hooks.run_blocks(blocks, top_k, p, continuation=True):
                normed = bb.hooks.decoder(inputs_embeds=hidden, attention_mask=prompt.attention_mask[rows],
                                          position_ids=prompt.position_ids[..., rows, :], cache=own, use_cache=True,
                                          **extra).last_hidden_state
        finally:
            hook.remove()
        return after["h"], normed, [(layer.keys, layer.values) for layer in own.layers]

    def _answer(self, prompt, prefix: Prefix, knobs: Knobs, kept: list[int], rows: torch.Tensor, normed,
                layers: list, max_new: int) -> Generation:
        """Decode configuration `knobs` (its `kept` blocks) on `rows` from its prompt's last (normed)
        hidden states and its blocks' keys and values after p."""
        bb, p = self.backbone, knobs.insertion
        logits = bb.model.get_output_embeddings()(normed[:, -1:])
        cache = DynamicCache()
        for i in range(p):
            layer = prefix.cache.layers[i]
            cache.update(layer.keys[rows], layer.values[rows], i)
        for j, (keys, values) in enumerate(layers):
            cache.update(keys, values, p + j)
        with bb.hooks.run_blocks(kept, knobs.top_k, p):
            out_ids = bb.greedy(logits, prompt.attention_mask[rows], prompt.position_ids[..., rows, :],
                                bb.cached_step(cache), max_new)
        return self._generation(prompt, rows, out_ids, knobs)

    def _generation(self, prompt, rows: torch.Tensor, out_ids: torch.Tensor, knobs: Knobs) -> Generation:
        token_ids, answers, n_out = self.backbone.answers(out_ids)
        r = rows.tolist()
        return Generation(answers, n_out, [prompt.vision_tokens[i] for i in r], [prompt.text_tokens[i] for i in r],
                          token_ids=token_ids, knobs=knobs)
