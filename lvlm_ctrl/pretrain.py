"""Pretrain the embedded tiny MoE VLM on easy-VQA, at all three tiers, with Lightning.

    python -m lvlm_ctrl.pretrain                       # writes outputs/.../tiny_moe, then
    python -m lvlm_ctrl.pretrain install=true          # also copies it into lvlm_ctrl/assets/tiny_moe

Three phases (README, "The embedded default backbone"): the vision tower alone learns colour and
shape; open questions only; then everything. A fraction `random_config_prob` of the batches run a
random configuration of the knob space (random blocks skipped, random top_k after a random
insertion) so every configuration answers sensibly; the rest run the full one. Images are
preprocessed once per tier by the real processor and cached as tensors.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from lvlm_ctrl.backbone import EMBEDDED, set_experts_implementation
from lvlm_ctrl.backbone.hooks import KnobHooks
from lvlm_ctrl.backbone.tiny_moe import PROMPT, build
from lvlm_ctrl.data import easy_vqa, load_image
from lvlm_ctrl.errors import cli
from lvlm_ctrl.knobs import Knobs, KnobSpace


class TieredVQA(torch.utils.data.Dataset):
    """Token ids and answer per question; pixels come from a per-tier cache keyed by image path."""

    def __init__(self, samples, tokenizer, answer_ids, prompt: str = PROMPT):
        self.items = []
        self.open_idx = [i for i, s in enumerate(samples) if s.answers[0] not in ("yes", "no")]
        for s in samples:
            before, after = prompt.format(question=s.question).split("<image>")
            pre = tokenizer(before)["input_ids"]  # with <s>
            post = tokenizer(after, add_special_tokens=False)["input_ids"]
            self.items.append((s.image_path, (pre, post), answer_ids[s.answers[0]]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Curriculum(torch.utils.data.Sampler):
    """First `warm_samples` from the open questions (colour, shape) only, then `epochs` passes.

    Three quarters of easy-VQA are yes/no questions answerable at 0.8 from the question alone; a
    model that starts on them settles on those priors and never learns to look. Open questions
    cannot be answered without the image, so they teach the answer position to read the image first.
    """

    def __init__(self, open_idx: list[int], size: int, warm_samples: int, epochs: int, seed: int):
        self.open_idx, self.size, self.warm, self.epochs, self.seed = open_idx, size, warm_samples, epochs, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        if self.open_idx and self.warm:
            picks = torch.randint(len(self.open_idx), (self.warm,), generator=g)
            yield from (self.open_idx[i] for i in picks.tolist())
        for _ in range(self.epochs):
            yield from torch.randperm(self.size, generator=g).tolist()

    def __len__(self):
        return (self.warm if self.open_idx else 0) + self.epochs * self.size


class Collate:
    """Batches share one tier (so one sequence shape); the tier is drawn per batch."""

    def __init__(self, pixels: dict, image_tokens: dict, image_token_id: int, pad_id: int, eos_id: int,
                 tiers: list[str], image_labels: dict, fixed_tier: str | None = None):
        self.pixels, self.image_tokens, self.image_token_id = pixels, image_tokens, image_token_id
        self.image_labels = image_labels
        self.pad_id, self.eos_id, self.tiers, self.fixed_tier = pad_id, eos_id, tiers, fixed_tier

    def __call__(self, items):
        tier = self.fixed_tier or random.choice(self.tiers)
        n_img = self.image_tokens[tier]
        seqs = []
        for _, (pre, post), ans in items:
            seqs.append(pre + [self.image_token_id] * n_img + post + [ans, self.eos_id])
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), self.pad_id)
        labels = torch.full((len(seqs), width), -100)
        for r, seq in enumerate(seqs):
            input_ids[r, width - len(seq):] = torch.tensor(seq)
            labels[r, -2:] = torch.tensor(seq[-2:])
        return {
            "tier": tier,
            "pixel_values": torch.stack([self.pixels[tier][path] for path, *_ in items]),
            "input_ids": input_ids,
            "attention_mask": (input_ids != self.pad_id).long(),
            "labels": labels,
            "image_labels": torch.stack([self.image_labels.get(path, NO_LABEL) for path, *_ in items]),
        }


NO_LABEL = torch.tensor([-100, -100])


def image_label_tensors(samples) -> dict[str, torch.Tensor]:
    index = {a: i for i, a in enumerate(easy_vqa.COLORS)} | {s: i for i, s in enumerate(easy_vqa.SHAPES)}
    return {path: torch.tensor([index.get(c, -100), index.get(s, -100)])
            for path, (c, s) in easy_vqa.image_attributes(samples).items()}


def masked_ce(logits, target):
    """Cross-entropy over the rows that have a label; 0 (not NaN) when none has."""
    keep = target != -100
    return F.cross_entropy(logits[keep], target[keep]) if keep.any() else logits.sum() * 0


class PretrainModule(L.LightningModule):
    def __init__(self, model, space: KnobSpace, lr: float, weight_decay: float, warmup_steps: int,
                 random_config_prob: float, total_steps: int, answer_types: dict[int, str],
                 aux_weight: float = 0.0, vision_warmup_steps: int = 0):
        super().__init__()
        self.model = model
        # Training-only probe: colour and shape from the pooled image tokens, so the vision path
        # gets a direct signal from every sample, not only from the quarter that are open questions.
        hidden = model.config.text_config.hidden_size
        self.aux_head = torch.nn.Linear(hidden, len(easy_vqa.COLORS) + len(easy_vqa.SHAPES))
        self.aux_weight, self.vision_warmup_steps = aux_weight, vision_warmup_steps
        self.answer_types = answer_types
        self.space = space
        self.hooks = KnobHooks(model)
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.random_config_prob, self.total_steps = random_config_prob, total_steps

    def _loss(self, batch, knobs: Knobs):
        model = self.model
        with self.hooks.apply(knobs):
            feats = model.model.get_image_features(batch["pixel_values"], interpolate_pos_encoding=True).pooler_output
            embeds = model.get_input_embeddings()(batch["input_ids"])
            mask = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, torch.cat(list(feats)))
            attn = batch["attention_mask"]
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, use_cache=False).logits
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        answer_pos = labels != -100
        # The first labelled position is the answer word; exact match on it is easy-VQA accuracy.
        first = answer_pos.float().argmax(-1)
        rows = torch.arange(labels.shape[0], device=labels.device)
        correct = logits[rows, first].argmax(-1) == labels[rows, first]
        if self.aux_weight and self.training:
            loss = loss + self.aux_weight * self._vision_loss(batch)
        return loss, correct, labels[rows, first]

    def _vision_loss(self, batch):
        feats = self.model.model.get_image_features(batch["pixel_values"], interpolate_pos_encoding=True)
        aux = self.aux_head(torch.stack(list(feats.pooler_output)).mean(1))
        img, n = batch["image_labels"], len(easy_vqa.COLORS)
        return masked_ce(aux[:, :n], img[:, 0]) + masked_ce(aux[:, n:], img[:, 1])

    def training_step(self, batch, _):
        if self.global_step < self.vision_warmup_steps:
            # The vision tower learns colour and shape by itself first (seconds, no decoder pass):
            # trained jointly from scratch, shape stays at chance for hundreds of steps.
            loss = self._vision_loss(batch)
            self.log("train/vision_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
            return loss
        knobs = training_knobs(self.space, self.hooks, batch["tier"], self.random_config_prob)
        loss, correct, _ = self._loss(batch, knobs)
        self.log_dict({"train/loss": loss, "train/acc": correct.float().mean()}, prog_bar=True,
                      batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch, _):
        loss, correct, answers = self._loss(batch, self.space.full())
        n = len(batch["labels"])
        self.log_dict({"val/loss": loss, "val/acc": correct.float().mean()}, prog_bar=True, batch_size=n)
        # Per answer type, because the overall figure hides a model that only learned the priors.
        kinds = [self.answer_types.get(int(a), "other") for a in answers]
        for kind in sorted(set(kinds)):
            rows = torch.tensor([k == kind for k in kinds])
            self.log(f"val/acc_{kind}", correct[rows].float().mean(), batch_size=int(rows.sum()))

    def on_validation_epoch_end(self):
        m = self.trainer.callback_metrics
        if "val/acc" in m:  # one line per validation, so a log file shows the learning curve
            parts = " ".join(f"{k[4:]} {float(v):.3f}" for k, v in sorted(m.items()) if k.startswith("val/acc"))
            print(f"step {self.global_step}: {parts}", flush=True)

    def configure_optimizers(self):
        # the backbone's parameters only: the shipped weights were trained so (the probe head stays at
        # its initialisation, a fixed random target for the pooled image tokens)
        return warmup_cosine(self.model.parameters(), self.lr, self.weight_decay, self.warmup_steps, self.total_steps)


def training_knobs(space: KnobSpace, hooks: KnobHooks, tier: str, random_config_prob: float) -> Knobs:
    """The configuration a training batch runs at `tier`: the full one, or with probability
    random_config_prob a random one, blocks skipped by a random ranking (set on `hooks`) so that the
    model learns to survive any of them skipped."""
    full = space.full()
    if random.random() < random_config_prob:
        p = random.choice(space.insertions)
        knobs = Knobs(tier, p, random.choice(space.top_ks), random.choice(space.num_blocks_options(p)))
        rest = list(range(1, space.num_layers))
        random.shuffle(rest)
        hooks.ranking = [0] + rest
        return knobs
    return Knobs(tier, full.insertion, full.top_k, full.num_blocks)


def warmup_cosine(params, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW, linear warm-up, then cosine to 5% of lr at total_steps: configure_optimizers' return."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(frac * torch.pi)).item())

    return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}]


def cache_pixels(processor, paths: list[str], tiers: dict[str, int], cache_file: str | None = None) -> dict:
    """Pixels of every image at every tier, from the real image processor; reused from cache_file."""
    if cache_file and Path(cache_file).exists():
        return torch.load(cache_file)
    images = {p: load_image(p) for p in paths}
    cache = {}
    for tier, side in tiers.items():
        px = processor.image_processor(list(images.values()), size={"height": side, "width": side},
                                       return_tensors="pt")["pixel_values"]
        cache[tier] = dict(zip(images, px))
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        torch.save(cache, cache_file)
    return cache


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
@cli
def main(cfg: DictConfig) -> float:
    start = time.time()
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.threads)
    model, processor = build(easy_vqa.vocabulary(), seed=cfg.seed, **cfg.sizes)
    # grouped_mm has a CPU kernel in torch >= 2.10: 2x faster than the eager loop for a training step.
    set_experts_implementation(model, cfg.experts_implementation)
    tiers = dict(cfg.model.tiers)
    space = KnobSpace(tiers=tuple(tiers), num_layers=model.config.text_config.num_hidden_layers)
    tok = processor.tokenizer
    answer_ids = {a: tok.convert_tokens_to_ids(a) for a in easy_vqa.answers()}
    splits = {s: easy_vqa.load(s) for s in ("train", "val", "test")}
    pixels = cache_pixels(processor, sorted({s.image_path for v in splits.values() for s in v}), tiers,
                          cfg.pixel_cache)
    patch = model.config.vision_config.patch_size
    collate_args = {"pixels": pixels, "image_tokens": {t: (s // patch) ** 2 for t, s in tiers.items()},
                    "image_token_id": model.config.image_token_id, "pad_id": tok.pad_token_id,
                    "eos_id": tok.eos_token_id, "tiers": list(tiers),
                    "image_labels": image_label_tensors(splits["train"] + splits["val"])}
    train = TieredVQA(splits["train"], tok, answer_ids, cfg.model.prompt)
    warm = (cfg.vision_warmup_steps + cfg.curriculum_batches) * cfg.batch_size
    sampler = Curriculum(train.open_idx, len(train), warm, cfg.epochs, cfg.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         collate_fn=Collate(**collate_args))
    full_tier = space.tiers[-1]
    val_samples = splits["val"][: cfg.val_limit]
    val_loader = torch.utils.data.DataLoader(TieredVQA(val_samples, tok, answer_ids, cfg.model.prompt), batch_size=256,
                                             collate_fn=Collate(**collate_args, fixed_tier=full_tier))
    total_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else len(loader)
    answer_types = {i: ("yesno" if a in ("yes", "no") else "shape" if a in easy_vqa.SHAPES else "color")
                    for a, i in answer_ids.items()}
    module = PretrainModule(model, space, cfg.lr, cfg.weight_decay, cfg.warmup_steps,
                            cfg.random_config_prob, total_steps, answer_types, cfg.aux_weight,
                            cfg.vision_warmup_steps)
    trainer = hydra.utils.instantiate(cfg.trainer, max_epochs=1)  # the sampler holds the epochs
    trainer.fit(module, loader, val_loader)

    test_loader = torch.utils.data.DataLoader(TieredVQA(splits["test"][: cfg.test_limit], tok, answer_ids, cfg.model.prompt), batch_size=256,
                                              collate_fn=Collate(**collate_args, fixed_tier=full_tier))
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in test_loader:
            _, right, _ = module._loss(batch, space.full())
            correct += right.sum().item()
            total += len(batch["labels"])
    test_acc = correct / total
    out = Path(cfg.output_dir)
    save(model, processor, out, {
        "command": " ".join(["python -m lvlm_ctrl.pretrain"] + sys.argv[1:]),
        "seed": cfg.seed, "steps": trainer.global_step, "wall_s": round(time.time() - start, 1),
        "test_teacher_forced_acc": round(test_acc, 4), "config": OmegaConf.to_container(cfg, resolve=True),
    })
    print(f"test accuracy (full configuration, teacher-forced): {test_acc:.4f}; saved to {out}")
    if cfg.install:
        shutil.copytree(out, EMBEDDED, dirs_exist_ok=True)
        print(f"installed into {EMBEDDED}")
    return test_acc


def save(model, processor, out: Path, provenance: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16).save_pretrained(tmp)  # fp16 keeps the committed weights under 10 MB
    model.to(torch.float32)
    processor.save_pretrained(tmp)
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    main()
