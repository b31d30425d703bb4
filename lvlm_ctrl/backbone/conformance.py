"""Is our path the model? Checks of a loaded backbone against the untouched model's own forward and
`generate`, and that no knob is silently ignored. The tests run them on every family's tiny
checkpoint; `python -m lvlm_ctrl.check` runs them on a user's checkpoint, on one sample.
"""

from __future__ import annotations

import inspect

import torch

from lvlm_ctrl.knobs import Knobs


def model_inputs(backbone, images, questions, tier: str) -> dict:
    return dict(backbone.preprocess(images, questions, tier))


@torch.inference_mode()
def logit_difference(backbone, images, questions) -> float:
    """max |logit| difference of the full configuration's prefill through our path against model(**inputs)."""
    full = backbone.space.full()
    ref = backbone.model(**model_inputs(backbone, images, questions, full.tier)).logits[:, -1]
    with backbone.hooks.apply(full):
        prompt = backbone.encode(images, questions, full.tier)
        ours = backbone.prefill(prompt, backbone.vision(prompt), logits_to_keep=1).logits[:, -1]
    return float((ours.float() - ref.float()).abs().max())


@torch.inference_mode()
def generate_mismatches(backbone, images, questions, max_new_tokens: int = 6) -> list[int]:
    """Rows whose greedy answer at the full configuration differs from the model's own generate."""
    full = backbone.space.full()
    inputs = model_inputs(backbone, images, questions, full.tier)
    out = backbone.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=backbone.eos_id, pad_token_id=backbone.tokenizer.pad_token_id)
    ref = out[:, inputs["input_ids"].shape[1]:].tolist()
    ours = backbone.generate(images, questions, full, max_new_tokens=max_new_tokens).token_ids
    return [i for i, (row, r) in enumerate(zip(ours, ref))
            if row != r[: len(row)] or not (row[-1] == backbone.eos_id or len(row) == max_new_tokens)]


def vision_tokens_per_tier(backbone, image, question) -> dict[str, int]:
    return {t: backbone.encode([image], [question], t).vision_tokens[0] for t in backbone.space.tiers}


def expert_layers(hooks) -> list[tuple[int, torch.nn.Module]]:
    """(block index, module) for every expert layer in the decoder blocks: the modules that run the
    experts a token was routed to (transformers' MoE layers take `top_k_index`), found without the
    family's adapter, so a router the adapter misses shows up as a count it did not set."""
    found = []
    for i, block in enumerate(hooks.blocks):
        for module in block.modules():
            try:
                params = inspect.signature(module.forward).parameters
            except (TypeError, ValueError):
                continue
            if "top_k_index" in params:
                found.append((i, module))
    return found


@torch.inference_mode()
def routed_experts(backbone, image, question, insertion: int = 2) -> dict[int, dict[int, set[int]]]:
    """top_k -> {block: the numbers of experts its tokens ran through}, counted at every expert layer
    (the routers' outputs where a family's experts take no top_k_index)."""
    hooks, routed, out = backbone.hooks, {}, {}

    def count(i):
        def hook(_module, args, kwargs):
            indices = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            if indices is not None:
                routed.setdefault(i, set()).add(indices.shape[-1])
        return hook

    def count_output(i):
        def hook(_module, _args, output):
            indices = output[-1] if isinstance(output, tuple) else output
            routed.setdefault(i, set()).add(indices.shape[-1])
        return hook

    layers = expert_layers(hooks)
    handles = ([m.register_forward_pre_hook(count(i), with_kwargs=True) for i, m in layers] if layers else
               [r.register_forward_hook(count_output(i)) for i, r in hooks.routers])
    try:
        for k in backbone.space.top_ks:
            routed.clear()
            knobs = Knobs(backbone.space.tiers[0], insertion, k, hooks.num_layers)
            backbone.generate([image], [question], knobs, max_new_tokens=2, stop_at_eos=False)
            out[k] = dict(routed)
    finally:
        for h in handles:
            h.remove()
    return out


def state(backbone) -> tuple:
    """Everything a request may touch: the block list, layer indices, routers' top_k, config, weights."""
    hooks = backbone.hooks
    return ([id(b) for b in hooks.decoder.layers], [m.layer_idx for b in hooks.blocks for m in b.modules()
                                                    if hasattr(m, "layer_idx")],
            [r.top_k for _, r in hooks.routers], backbone.model.config.to_dict(),
            {k: v.clone() for k, v in backbone.model.state_dict().items()})


def same_state(a: tuple, b: tuple) -> bool:
    return a[:4] == b[:4] and a[4].keys() == b[4].keys() and all(torch.equal(a[4][k], b[4][k]) for k in a[4])


def check(backbone, image, question, tolerance: float = 1e-4) -> dict:
    """All of the above on one request; `failures` lists what does not hold, in one line each."""
    before = state(backbone)
    report = {"family": type(backbone.family).__name__, "max_logit_difference": logit_difference(
        backbone, [image], [question]), "generate_mismatches": generate_mismatches(backbone, [image], [question])}
    report["vision_tokens"] = vision_tokens_per_tier(backbone, image, question)
    trained = max(backbone.hooks.default_top_k)
    routed = routed_experts(backbone, image, question)
    report["routed_experts"] = {k: sorted(set().union(*[v for i, v in r.items() if i >= 2])) for k, r in routed.items()}
    failures = []
    if report["max_logit_difference"] > tolerance:
        failures.append(f"the full configuration's logits differ from the model's own forward by "
                        f"{report['max_logit_difference']:.3g}")
    if report["generate_mismatches"]:
        failures.append("greedy answers differ from the model's own generate")
    counts = list(report["vision_tokens"].values())
    if len(set(counts)) != len(counts):
        failures.append(f"tiers {report['vision_tokens']} do not all give different vision-token counts "
                        "(an image smaller than the lower tiers' caps, or a tier the processor ignores)")
    for k, r in routed.items():
        if any(v != ({k} if i >= 2 else {trained}) for i, v in r.items()) or not r:
            failures.append(f"top_k={k} did not route every token of the blocks after the insertion point to {k} experts")
    if not same_state(before, state(backbone)):
        failures.append("a request left the model, its routers or its config changed")
    report["failures"] = failures
    return report
