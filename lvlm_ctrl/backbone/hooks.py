"""Apply a configuration to a Hugging Face MoE decoder for one request, and restore it after.

No extra forward pass: top_k is an attribute each router reads at call time, and skipping blocks
swaps the decoder's ModuleList for the kept blocks. Attention and the KV cache index by
`layer_idx`, so kept blocks are renumbered 0..n-1 and `num_hidden_layers` (and `layer_types`, where
the config has it) made to match. Block 0 always stays: the cache reads the sequence length there;
so do the blocks the family pins (e.g. Qwen3-VL's deepstack targets). Where the blocks and routers
are is the family's business (families.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from lvlm_ctrl.backbone.families import Family, family_class
from lvlm_ctrl.knobs import Knobs


@dataclass
class Capture:
    """The latency token: hidden state of the last token after block p-1, from the prefill."""

    latency_token: torch.Tensor | None = None
    decision: tuple[int, int] | None = None


class KnobHooks:
    def __init__(self, model: nn.Module, ranking: list[int] | None = None, family: Family | None = None):
        family = family or family_class(model.config.model_type)(model)
        self.decoder = family.decoder()
        self.blocks = list(self.decoder.layers)
        self.num_layers = len(self.blocks)
        self.pinned = sorted(i for i in family.pinned_blocks() if i < self.num_layers)
        # (block index, router) for every router: a block may have none (dense) or several
        self.routers = [(i, r) for i, b in enumerate(self.blocks) for r in family.routers(b)]
        # per block, each module that owns routers (the MoE layer, which calls them) with its routers
        self.moe_layers = [_moe_layers(b, family.routers(b)) for b in self.blocks]
        self.default_top_k = [r.top_k for _, r in self.routers]
        self.ranking = list(ranking) if ranking is not None else list(range(self.num_layers))
        self._saved_types = getattr(self.decoder.config, "layer_types", None)
        if sorted(self.ranking) != list(range(self.num_layers)):
            raise ValueError(f"block ranking must be a permutation of 0..{self.num_layers - 1}")

    def kept_blocks(self, insertion: int, num_blocks: int) -> list[int]:
        """Blocks [0, p) and the pinned ones, plus the most important others up to num_blocks, in order."""
        fixed = set(range(insertion)) | set(self.pinned)
        extra = [i for i in self.ranking if i not in fixed][: max(num_blocks - len(fixed), 0)]
        return sorted(fixed | set(extra))

    def apply(self, knobs: Knobs, capture: bool = False):
        """Within the block the decoder runs `knobs`; yields a Capture filled by the prefill."""
        kept = self.kept_blocks(knobs.insertion, knobs.num_blocks)
        return self.run_blocks(kept, knobs.top_k, knobs.insertion, knobs.insertion - 1 if capture else None)

    @contextmanager
    def run_blocks(self, kept: list[int], top_k: int | None = None, top_k_from: int = 0,
                   capture_after: int | None = None, continuation: bool = False):
        """The general form: any kept list with block 0, top_k on routers of blocks >= top_k_from.
        A `continuation` (the rollout engine's blocks after p, from hidden states it gives, with a
        cache of their own) starts anywhere: its first block reads its cache's length."""
        state = Capture()
        saved = self._save()
        handle = self._capture(state, capture_after) if capture_after is not None else None
        try:
            self._configure(kept, top_k, top_k_from, continuation)
            yield state
        finally:
            if handle is not None:
                handle.remove()
            self._restore(saved)

    @contextmanager
    def per_row(self, blocks: list[int], keep: torch.Tensor, top_k: torch.Tensor, continuation: bool = False,
                shared: list | None = None):
        """Blocks `blocks` in order, each row of the batch at a configuration of its own (the rollout
        engine's batches of many configurations): row r runs block blocks[j] where keep[r, j], its
        hidden states passing unchanged where not, with top_k[r, j] experts (-1: the block's default).
        A block no row keeps is not called. Rows at one top_k form one call of the MoE layer.
        Yields select(rows): from then on the batch is those rows (decoding drops the ended ones).
        shared (`shared_rows`, per block): rows whose states are equal run the block once, on one of
        them (a prefill only: block j's cache then holds those representatives' keys and values)."""
        saved = self._save()
        shared = shared or [None] * len(blocks)
        try:
            self._configure(blocks, None, 0, continuation)
            gated = [_RowBlock(self.blocks[b], keep[:, j], top_k[:, j], self.moe_layers[b], shared[j])
                     for j, b in enumerate(blocks)]
            self.decoder.layers = nn.ModuleList(gated)
            yield lambda rows: [g.select(rows) for g in gated]
        finally:
            self._restore(saved)

    @contextmanager
    def staged(self, insertion: int, decide):
        """Two-stage serving in one forward pass: blocks [0, p) run at the default top_k; after block
        p-1, `decide(latency_token) -> (top_k, num_blocks)` picks the rest, which then run in the same
        pass (and in every decode step after it)."""
        state = Capture()
        saved = self._save()
        handle = self._capture(state, insertion - 1)
        hooks = self

        class Staged(nn.Module):
            # The decoder iterates self.layers (or a slice of it); this yields the prefix, asks for
            # the decision, reconfigures the model, then yields the kept blocks after p.
            def __getitem__(self, _idx):
                return self

            def __iter__(self):
                yield from hooks.blocks[:insertion]
                top_k, num_blocks = decide(state.latency_token)
                state.decision = (top_k, num_blocks)
                kept = hooks.kept_blocks(insertion, num_blocks)
                hooks._configure(kept, top_k, insertion)
                yield from (hooks.blocks[i] for i in kept[insertion:])

        try:
            self.decoder.layers = Staged()
            yield state
        finally:
            handle.remove()
            self._restore(saved)

    def probe(self, query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
              attention_mask: torch.Tensor, position: torch.Tensor, insertions: list[int]) -> torch.Tensor:
        """The budget token's pass (controller.budget_token): `query` (B, 1, d) runs through blocks
        [0, max p) as one more token after a prompt whose per-block keys and values are given
        ((B, heads, L, head_dim) each, left-padded as `attention_mask` (B, L)), at the position the
        prompt's next token would have (`Prompt.next_position`). Returns its hidden state after block
        p-1 for each p of `insertions`: (B, len(insertions), d).

        The token is appended after the prompt's pass, in a cache of its own, so the prompt's
        states, and the answer, are exactly those without it (causal attention): the profile stays
        valid, and only the latency token learns the budget."""
        last = max(insertions)
        cache = DynamicCache()
        for i in range(last):
            cache.update(keys[i], values[i], i)
        attn = torch.cat([attention_mask, attention_mask.new_ones(len(query), 1)], dim=1)
        out: dict[int, torch.Tensor] = {}

        def grab(p):
            def hook(_module, _args, output):
                out[p] = (output[0] if isinstance(output, tuple) else output)[:, -1]
            return hook

        handles = [self.blocks[p - 1].register_forward_hook(grab(p)) for p in set(insertions)]
        # inside staged serving too: the decoder's loop already holds the Staged iterator, which
        # configures the blocks after p itself once this returns
        try:
            with self.run_blocks(list(range(last))):
                self.decoder(inputs_embeds=query, attention_mask=attn, position_ids=position,
                             cache=cache, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        return torch.stack([out[p] for p in insertions], dim=1)

    # ---- the three moves every path shares ----------------------------------------------
    def _save(self):
        config = self.decoder.config
        return (getattr(config, "layer_types", None),
                {id(m): m.layer_idx for b in self.blocks for m in b.modules() if hasattr(m, "layer_idx")})

    def _capture(self, state: Capture, block: int):
        def grab(_module, _args, output):
            if state.latency_token is None:  # the prefill; decode steps come later
                hidden = output[0] if isinstance(output, tuple) else output
                state.latency_token = hidden[:, -1].detach()
        return self.blocks[block].register_forward_hook(grab)

    def _configure(self, kept: list[int], top_k: int | None, top_k_from: int, continuation: bool = False) -> None:
        if not kept or (kept[0] != 0 and not continuation):
            raise ValueError("block 0 must be kept: the KV cache reads the sequence length from it")
        config = self.decoder.config
        for i, router in self.routers:
            if top_k is not None and i >= top_k_from:
                router.top_k = top_k
        for new_idx, old_idx in enumerate(kept):
            for m in self.blocks[old_idx].modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new_idx
        self.decoder.layers = nn.ModuleList([self.blocks[i] for i in kept])
        config.num_hidden_layers = len(kept)
        if (types := self._saved_types) is not None:
            config.layer_types = [types[i] for i in kept]

    def _restore(self, saved) -> None:
        saved_types, saved_idx = saved
        config = self.decoder.config
        for (_, router), top_k in zip(self.routers, self.default_top_k):
            router.top_k = top_k
        for b in self.blocks:
            for m in b.modules():
                if id(m) in saved_idx:
                    m.layer_idx = saved_idx[id(m)]
        self.decoder.layers = nn.ModuleList(self.blocks)
        config.num_hidden_layers = self.num_layers
        if saved_types is not None:
            config.layer_types = saved_types


_FUSABLE: dict[type, bool] = {}


def _fusable(module: nn.Module, router: nn.Module) -> bool:
    """Whether `module` calls `router` (its child) on all its tokens flattened and hands the
    (logits, weights, indices) it returns to its experts: a router of that kind (tried once per
    class on two zero tokens) directly under the module."""
    if not any(c is router for c in module.children()):
        return False
    kind = type(router)
    if kind not in _FUSABLE:
        weight = getattr(router, "weight", None)
        ok = isinstance(weight, torch.Tensor) and weight.dim() == 2
        if ok:
            with torch.no_grad():
                out = router(weight.new_zeros(2, weight.shape[-1]))
            ok = isinstance(out, tuple) and len(out) == 3 and not out[2].is_floating_point() \
                and tuple(out[2].shape) == (2, router.top_k) and tuple(out[1].shape) == (2, router.top_k)
        _FUSABLE[kind] = ok
    return _FUSABLE[kind]


def _moe_layers(block: nn.Module, routers: list[nn.Module]) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(child of `block`, the routers under it) for each child with routers: the MoE layer as the
    block calls it, on (batch, tokens, hidden) (inside it, a family may flatten or split tokens)."""
    ids = {id(r) for r in routers}
    found = []
    for child in block.children():
        mine = [m for m in child.modules() if id(m) in ids]
        if mine:
            found.append((child, mine))
    return found


class _RowBlock(nn.Module):
    """A decoder block run per row (KnobHooks.per_row): its output where the row keeps it, its input
    where not. Inside it, each row's tokens go to their own top_k: by padded routing (`_padded`,
    the experts once) where the router allows it, else the MoE layer once per top_k (`_partitioned`)."""

    def __init__(self, block: nn.Module, keep: torch.Tensor, top_k: torch.Tensor, moe_layers, shared=None):
        super().__init__()
        self.block, self.moe_layers, self.shared = block, moe_layers, shared
        self._rows(keep, top_k)

    def _rows(self, keep: torch.Tensor, top_k: torch.Tensor) -> None:
        self.keep, self.top_k = keep, top_k
        self.any, self.all = bool(keep.any()), bool(keep.all())
        self.parts = [(int(k), (keep & (top_k == k)).nonzero()[:, 0]) for k in torch.unique(top_k[keep]).tolist()]

    def select(self, rows: torch.Tensor) -> None:
        self._rows(self.keep[rows], self.top_k[rows])

    def __getattr__(self, name):
        # what the decoder reads off its blocks (e.g. attention_type) is the wrapped block's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not self.any:
            return hidden
        if self.shared is not None:
            return self._shared(hidden, args, kwargs)
        patched = []
        for module, routers in self.moe_layers:
            if all(_fusable(module, r) for r in routers):  # the experts once, every row's routing padded
                patched += [(r, r.__dict__.get("forward"), self._padded(r.forward, r, *hidden.shape[:2])) for r in routers]
            else:  # the whole MoE layer once per top_k
                patched.append((module, module.__dict__.get("forward"), self._partitioned(module.forward, routers)))
        for obj, _, forward in patched:
            obj.forward = forward
        try:
            out = self.block(*args, **kwargs)
        finally:
            for obj, own, _ in patched:  # the instance's own forward, if it had one, or the class's
                if own is None:
                    del obj.forward
                else:
                    obj.forward = own
        if self.all:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = torch.where(self.keep[:, None, None], h, hidden)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _shared(self, hidden, args, kwargs):
        """The block on one representative of each set of rows whose states are equal, its output
        copied to the others (rows that skip the block keep their input)."""
        reps, of = self.shared
        rows, keep, top_k = hidden.shape[0], self.keep, self.top_k
        self.shared = None
        self._rows(keep[reps], top_k[reps])
        try:
            out = self.forward(*(_pick(v, reps, rows, 2) for v in args),
                               **{n: _pick(v, reps, rows, 2) for n, v in kwargs.items()})
        finally:
            self._rows(keep, top_k)
            self.shared = (reps, of)
        h = out[0] if isinstance(out, tuple) else out
        h = torch.where(keep[:, None, None], h[of], hidden)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _padded(self, forward, router, rows: int, tokens: int):
        """A router over the tokens of all `rows` (row after row, as the MoE layer flattens them)
        that routes each row's tokens to its own top_k and pads them to the largest with zero-weight
        picks of their first expert: one call of the experts for every top_k, each token's output
        the sum of its own top_k's (the zeros add nothing). Rows that skip the block route at the
        largest top_k, all to their first expert at zero weight (their output is dropped)."""
        parts, default = self.parts, router.top_k

        def run(hidden_states):
            # routers take the tokens flattened (OLMoE, Qwen) or as the block holds them (GLM-4.5V)
            flat = hidden_states.dim() == 2
            if tuple(hidden_states.shape[:2 - flat]) != ((rows * tokens,) if flat else (rows, tokens)):
                raise RuntimeError(f"{type(router).__name__} got tokens shaped {tuple(hidden_states.shape)}, not the "
                                   f"block's {rows} x {tokens}: route this family's MoE layers per top_k (_partitioned)")
            ks = [default if k < 0 else k for k, _ in parts]
            width = max(ks)
            logits = weights = index = None
            for k, (_, idx) in zip(ks, parts):
                at = (idx[:, None] * tokens + torch.arange(tokens, device=idx.device)).reshape(-1)
                router.top_k = k
                try:
                    lg, w, ix = forward(hidden_states[at] if flat else hidden_states[idx])
                finally:
                    router.top_k = default
                if logits is None:
                    n = rows * tokens
                    logits, weights = lg.new_zeros((n, lg.shape[-1])), w.new_zeros((n, width))
                    index = ix.new_zeros((n, width))
                logits[at], weights[at, :k], index[at, :k] = lg, w, ix
                index[at, k:] = ix[:, :1]
            return logits, weights, index
        return run

    def _partitioned(self, forward, routers):
        """The MoE layer's forward called once per top_k on the rows that keep the block at it
        (their per-row inputs sliced alike); the other rows get zeros (their output is dropped)."""
        parts = self.parts

        def run(hidden_states, *args, **kwargs):
            rows = hidden_states.shape[0]
            out = None
            for k, idx in parts:
                saved = [r.top_k for r in routers]
                if k >= 0:
                    for r in routers:
                        r.top_k = k
                try:
                    if len(parts) == 1 and self.all:
                        return forward(hidden_states, *args, **kwargs)
                    part = forward(hidden_states[idx], *(_pick(v, idx, rows) for v in args),
                                   **{n: _pick(v, idx, rows) for n, v in kwargs.items()})
                finally:
                    for r, t in zip(routers, saved):
                        r.top_k = t
                first = part[0] if isinstance(part, tuple) else part
                if out is None:
                    out = first.new_zeros((rows, *first.shape[1:]))
                    rest = len(part) - 1 if isinstance(part, tuple) else None
                out[idx] = first
            # what a MoE layer returns beside its output (router logits) is for training losses only
            return out if rest is None else (out, *[None] * rest)
        return run


def _pick(value, idx: torch.Tensor, rows: int, min_dim: int = 1):
    """`value`'s rows `idx` if it is a per-row tensor (first dimension `rows`, at least `min_dim`
    dimensions), tuples of them (position embeddings) alike, else `value`."""
    if isinstance(value, tuple):
        return tuple(_pick(v, idx, rows, min_dim) for v in value)
    return value[idx] if isinstance(value, torch.Tensor) and value.dim() >= min_dim and value.shape[0] == rows else value


def shared_rows(keep: torch.Tensor, top_k: torch.Tensor, start: torch.Tensor) -> list:
    """Per block of a per-row prefill: (representative rows, each row's representative's position
    among them) where rows that keep the block have equal states and top_k (their states equal
    because they started equal, `start` (rows,) labelling equal starts, and ran the same blocks at
    the same top_k since), else None. A profile's configurations of one sample that differ only in
    the blocks they skip share every block up to the first one they differ in."""
    state, out = start, []
    for j in range(keep.shape[1]):
        k = keep[:, j]
        key = torch.stack([state, k.long(), torch.where(k, top_k[:, j], torch.full_like(top_k[:, j], -2))], 1)
        state = torch.unique(key, dim=0, return_inverse=True)[1]
        keepers = k.nonzero()[:, 0]
        kinds, which = torch.unique(state[keepers], return_inverse=True)
        if len(kinds) == len(keepers):  # nothing to share at this block
            out.append(None)
            continue
        reps = torch.full((len(kinds),), keep.shape[0], dtype=torch.long, device=keep.device)
        reps = reps.scatter_reduce(0, which, keepers, reduce="amin")
        of = torch.zeros(keep.shape[0], dtype=torch.long, device=keep.device)
        of[keepers] = which
        out.append((reps, of))
    return out
