"""Rank the decoder blocks by importance on a calibration split; the knob code skips the least.

    python -m lvlm_ctrl.importance                      # data.split=val data.limit=256
    python -m lvlm_ctrl.importance method=accuracy_drop install=true

Block Influence (BI) of block i is the mean over real (non-padding) tokens of 1 - cos(h_in, h_out),
taken with hooks during full-model prefills. Accuracy drop is the accuracy lost when block i alone
is removed, every such configuration of every sample answered in one run of the rollout engine.
Block 0 (and a family's pinned blocks) is never skipped, so it ranks first whatever its score.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lvlm_ctrl.backbone.rollout import Blocks, RolloutEngine
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import atomic_write_json, command, machine
from lvlm_ctrl.metrics import vqa_score


def batches(samples, size):
    for i in range(0, len(samples), size):
        chunk = samples[i:i + size]
        yield [s.load_image() for s in chunk], [s.question for s in chunk], chunk


@torch.inference_mode()
def block_influence(backbone, samples, batch_size: int) -> list[float]:
    totals = torch.zeros(backbone.hooks.num_layers, dtype=torch.float64)
    count = 0
    mask_holder = {}

    def hook(i):
        def fn(_module, args, output):
            h_in = args[0] if args else None
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
            totals[i] += ((1 - cos) * mask_holder["mask"]).sum().double()
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(backbone.hooks.blocks)]
    try:
        full = backbone.space.full()
        for images, questions, _ in batches(samples, batch_size):
            prompt = backbone.encode(images, questions, full.tier)
            mask_holder["mask"] = prompt.attention_mask.float()
            backbone.prefill(prompt, backbone.vision(prompt), use_cache=False, logits_to_keep=1)
            count += int(prompt.attention_mask.sum())
    finally:
        for h in handles:
            h.remove()
    return (totals / max(count, 1)).tolist()


def accuracy_drop(backbone, samples, batch_size: int) -> list[float]:
    """Per block, the accuracy lost without it (the full configuration otherwise): all of them
    on all samples in one run of the rollout engine. Blocks that are never skipped (block 0, the
    family's pinned ones) get inf: they rank first and stay."""
    n, full = backbone.hooks.num_layers, backbone.space.full()
    fixed = {0, *backbone.hooks.pinned}
    variants = {i: Blocks(full, tuple(j for j in range(n) if j != i)) for i in range(n) if i not in fixed}
    whole = Blocks(full, tuple(range(n)))
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    out = RolloutEngine(backbone, batch_size=batch_size).run(images, questions, [[whole, *variants.values()]] * len(samples))

    def accuracy(key) -> float:
        answers = [gen.answers[row] for gen, row in (out[(i, key)] for i in range(len(samples)))]
        return sum(vqa_score(a, list(s.answers)) for a, s in zip(answers, samples)) / len(samples)

    base = accuracy(whole)
    return [base - accuracy(variants[i]) if i in variants else float("inf") for i in range(n)]


def rank(scores: list[float]) -> list[int]:
    """Most important first; block 0 always first."""
    rest = sorted(range(1, len(scores)), key=lambda i: -scores[i])
    return [0] + rest


@hydra.main(version_base="1.3", config_path="../conf", config_name="importance")
@cli
def main(cfg: DictConfig) -> None:
    if cfg.method not in ("block_influence", "accuracy_drop"):
        raise UserError(f"unknown method {cfg.method!r}: choose block_influence or accuracy_drop")
    backbone = hydra.utils.instantiate(cfg.model)
    backbone.hooks.ranking = list(range(backbone.hooks.num_layers))
    samples = hydra.utils.instantiate(cfg.data).samples
    bi = block_influence(backbone, samples, cfg.batch_size)
    drop = accuracy_drop(backbone, samples, cfg.batch_size) if cfg.method == "accuracy_drop" else None
    ranking = rank(drop if drop is not None else bi)
    result = {
        "ranking": ranking, "method": cfg.method, "block_influence": bi,
        "accuracy_drop": None if drop is None else [None if d == float("inf") else d for d in drop],
        "dataset": cfg.data.name, "split": cfg.data.split, "num_samples": len(samples),
        "backbone": backbone.name, "command": command("lvlm_ctrl.importance"), "machine": machine(),
    }
    out = Path(cfg.output)
    atomic_write_json(out, result)
    print(f"ranking (most important first): {ranking}\nwrote {out}")
    if cfg.install:
        from lvlm_ctrl.backbone import backbone_dir

        atomic_write_json(backbone_dir(cfg.model.path, cfg.model.get("asset")) / "importance.json", result)
        print("installed as the backbone's default ranking")


if __name__ == "__main__":
    main()
