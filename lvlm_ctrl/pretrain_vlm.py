"""Pretrain a tiny real-family MoE VLM (build_tiny's architecture, word-level tokenizer) on a dataset,
with Lightning: the synth-VQA testbed's backbone (issue 17).

    python -m lvlm_ctrl.pretrain_vlm                  # tiny Qwen3-VL-MoE on synth_vqa, ~35 min on 2 cores
    python -m lvlm_ctrl.pretrain_vlm install=true     # also copies it into lvlm_ctrl/assets/tiny_qwen3_vl_moe

Every batch goes through the family's own processor (dynamic resolution: each image as many vision
tokens as its size needs, up to the tier's cap) and the model's own forward with language-model
labels on the answer's tokens and the end of turn, so answers of several words are learned as the
backbone generates them. The tier is drawn per batch; a fraction `random_config_prob` of the batches
run a random configuration of the knob space (random blocks skipped, random top_k after a random
insertion) so that every configuration answers sensibly.
"""

from __future__ import annotations

import inspect
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from lvlm_ctrl.backbone import ASSETS, set_experts_implementation
from lvlm_ctrl.backbone.build_tiny import BUILDERS
from lvlm_ctrl.backbone.families import family_class
from lvlm_ctrl.backbone.hooks import KnobHooks
from lvlm_ctrl.data import question_family, synth_vqa
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.knobs import Knobs, KnobSpace
from lvlm_ctrl.pretrain import save, training_knobs, warmup_cosine


class Collate:
    """A batch at one tier: the processor's outputs for prompt + answer + end of turn, and labels on
    the answer's tokens and the end of turn only (rows are left-padded, so those are each row's last)."""

    def __init__(self, processor, prompt: str, tier_kwargs: dict[str, dict], fixed_tier: str | None = None,
                 scene_labels=None):
        self.processor, self.prompt, self.tier_kwargs, self.fixed_tier = processor, prompt, tier_kwargs, fixed_tier
        self.eos = processor.tokenizer.eos_token
        self.scene_labels = scene_labels

    def __call__(self, samples):
        tier = self.fixed_tier or random.choice(list(self.tier_kwargs))
        tok = self.processor.tokenizer
        answers = [s.answers[0] + self.eos for s in samples]
        texts = [self.prompt.format(question=s.question) + a for s, a in zip(samples, answers)]
        inputs = self.processor(images=[s.load_image() for s in samples], text=texts, return_tensors="pt",
                                padding=True, **self.tier_kwargs[tier])
        labels = torch.full_like(inputs["input_ids"], -100)
        for row, a in enumerate(answers):
            n = len(tok(a, add_special_tokens=False)["input_ids"])
            labels[row, -n:] = inputs["input_ids"][row, -n:]
        batch = {"tier": tier, "inputs": dict(inputs), "labels": labels,
                 "families": [question_family(s.sample_id) for s in samples]}
        if self.scene_labels is not None:
            grids = inputs["image_grid_thw"].tolist()
            batch["scene"] = torch.cat([self.scene_labels(s.image_path, h, w) for s, (_, h, w) in zip(samples, grids)])
        return batch


def synth_token_labels(seed: int, merge: int = 2):
    """synth-VQA's scene under each merged vision token (the vision encoder's output, in raster order
    over the (h / merge) x (w / merge) grid of the resized image): the colour and shape of the object
    at the token's centre (or none), and the digit at the token holding the box's centre (-100, no
    target, elsewhere). Dense targets: every token of every image trains the vision tower, where one
    pooled target per image left shapes and digits at chance after 600 steps."""
    n_colours, n_shapes = len(synth_vqa.COLORS), len(synth_vqa.SHAPES)
    colour_idx = {c: i for i, c in enumerate(synth_vqa.COLORS)}
    shape_idx = {c: i for i, c in enumerate(synth_vqa.SHAPES)}

    def labels(image_path: str, grid_h: int, grid_w: int) -> torch.Tensor:
        scene = synth_vqa.scene_of(image_path, seed)
        rows, cols = grid_h // merge, grid_w // merge
        ys = (torch.arange(rows) + 0.5) * scene.height / rows
        xs = (torch.arange(cols) + 0.5) * scene.width / cols
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        colour = torch.full((rows, cols), n_colours)
        shape = torch.full((rows, cols), n_shapes)
        for c, sh, cx, cy, r in scene.objects:
            inside = synth_vqa.inside(sh, x - cx, y - cy, 0.9 * r)  # a margin: edges blur when resized
            colour[inside], shape[inside] = colour_idx[c], shape_idx[sh]
        digit = torch.full((rows, cols), -100)
        x0, y0, side = scene.box
        i = min(int((y0 + side / 2) / scene.height * rows), rows - 1)
        j = min(int((x0 + side / 2) / scene.width * cols), cols - 1)
        digit[i, j] = scene.digit
        return torch.stack([colour.flatten(), shape.flatten(), digit.flatten()], dim=-1)
    return labels


SCENE_CLASSES = (len(synth_vqa.COLORS) + 1, len(synth_vqa.SHAPES) + 1, 10)  # colour, shape (+ none), digit


class PretrainVLM(L.LightningModule):
    def __init__(self, model, space: KnobSpace, lr: float, weight_decay: float, warmup_steps: int,
                 total_steps: int, random_config_prob: float, scene_weight: float = 0.0,
                 vision_warmup_steps: int = 0):
        super().__init__()
        self.model, self.space = model, space
        self.hooks = KnobHooks(model)
        encoder = model.base_model.get_image_features
        self.vision_params = set(inspect.signature(encoder).parameters) - {"kwargs"}
        # Training-only probe: the scene under each vision token (synth_token_labels), so the vision
        # tower gets a direct signal from every sample (the toy's lesson: from the answer alone, it
        # learns to look only after hundreds of steps)
        self.scene_weight, self.vision_warmup_steps = scene_weight, vision_warmup_steps
        self.scene_head = torch.nn.Linear(model.config.get_text_config().hidden_size, sum(SCENE_CLASSES))
        self.lr, self.weight_decay, self.warmup_steps, self.total_steps = lr, weight_decay, warmup_steps, total_steps
        self.random_config_prob = random_config_prob

    def _forward(self, batch, knobs: Knobs):
        """-> (logits, the vision encoder's output) of the batch at `knobs`."""
        inputs = dict(batch["inputs"])
        vision = {k: inputs[k] for k in list(inputs) if k in self.vision_params}
        # the forward keeps the image grid (its multimodal rope positions read it, as in serving,
        # where Backbone.encode computes them from the same inputs) but not the pixels
        inputs = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}
        with self.hooks.apply(knobs):
            # the vision encoder once, its output given to the forward as Backbone.prefill does
            image = self.model.base_model.get_image_features(**vision, return_dict=True)
            return self.model(**inputs, mm_encoder_outputs={"image": image}, use_cache=False).logits, image

    def _loss(self, batch, knobs: Knobs):
        logits, image = self._forward(batch, knobs)
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        # teacher-forced exact match: every answer token and the end of turn right
        wrong = (logits.argmax(-1) != labels) & (labels != -100)
        if self.scene_weight and self.training and "scene" in batch:
            scene = self._scene_loss(image.pooler_output, batch["scene"])
            self.log("train/scene_loss", scene, batch_size=len(labels))
            loss = loss + self.scene_weight * scene
        return loss, ~wrong.any(-1)

    def _scene_loss(self, per_image, target):
        out = self.scene_head(torch.cat(list(per_image)))
        c, sh, _ = SCENE_CLASSES
        return (F.cross_entropy(out[:, :c], target[:, 0]) + F.cross_entropy(out[:, c:c + sh], target[:, 1])
                + F.cross_entropy(out[:, c + sh:], target[:, 2], ignore_index=-100))

    def training_step(self, batch, _):
        if self.global_step < self.vision_warmup_steps and "scene" in batch:
            # the vision tower learns the scene by itself first: no decoder pass, a fraction of a step
            vision = {k: v for k, v in batch["inputs"].items() if k in self.vision_params}
            image = self.model.base_model.get_image_features(**vision, return_dict=True)
            loss = self._scene_loss(image.pooler_output, batch["scene"])
            self.log("train/vision_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
            return loss
        knobs = training_knobs(self.space, self.hooks, batch["tier"], self.random_config_prob)
        loss, correct = self._loss(batch, knobs)
        self.log_dict({"train/loss": loss, "train/acc": correct.float().mean()}, prog_bar=True,
                      batch_size=len(correct))
        return loss

    def validation_step(self, batch, _):
        loss, correct = self._loss(batch, self.space.full())
        self.log("val/loss", loss, prog_bar=True, batch_size=len(correct))
        self.log("val/acc", correct.float().mean(), prog_bar=True, batch_size=len(correct))
        # per question family: the overall figure hides a model that learned only the easy ones
        by = defaultdict(list)
        for fam, c in zip(batch["families"], correct.tolist()):
            by[fam].append(c)
        for fam, cs in by.items():
            self.log(f"val/acc_{fam}", sum(cs) / len(cs), batch_size=len(cs))

    def on_validation_epoch_end(self):
        m = self.trainer.callback_metrics
        if "val/acc" in m:  # one line per validation: a log file shows the learning curve
            parts = " ".join(f"{k[4:]} {float(v):.3f}" for k, v in sorted(m.items()) if k.startswith("val/acc"))
            print(f"step {self.global_step}: {parts}", flush=True)

    def configure_optimizers(self):
        # every parameter, the scene probe's head included (the model's alone left it a fixed random target)
        return warmup_cosine(self.parameters(), self.lr, self.weight_decay, self.warmup_steps, self.total_steps)


def teacher_forced_accuracy(module: PretrainVLM, loader) -> dict[str, float]:
    """Exact match at the full configuration, overall and per question family."""
    by = defaultdict(list)
    module.eval()
    with torch.no_grad():
        for batch in loader:
            _, correct = module._loss(batch, module.space.full())
            for fam, c in zip(batch["families"], correct.tolist()):
                by[fam].append(c)
    scores = {fam: round(sum(cs) / len(cs), 4) for fam, cs in sorted(by.items())}
    scores["all"] = round(sum(map(sum, by.values())) / sum(map(len, by.values())), 4)
    return scores


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain_vlm")
@cli
def main(cfg: DictConfig) -> float:
    start = time.time()
    if cfg.family not in BUILDERS:
        raise UserError(f"family={cfg.family!r}: choose one of {', '.join(BUILDERS)}")
    builder = BUILDERS[cfg.family]
    if "words" not in inspect.signature(builder).parameters:
        trainable = [f for f, b in BUILDERS.items() if "words" in inspect.signature(b).parameters]
        raise UserError(f"family={cfg.family}: pretrain_vlm builds {', '.join(trainable)} only (a word-level "
                        "tokenizer over the dataset); give build_tiny's builder a `words` argument to add one")
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.threads)
    splits = {s: hydra.utils.instantiate(cfg.data, split=s, limit=None).samples for s in ("train", "val", "test")}
    words = sorted({w for v in splits.values() for s in v for text in (s.question, *s.answers)
                    for w in text.lower().replace("?", " ").split()})
    model, processor = builder(seed=cfg.seed, words=words, text_shape=dict(cfg.text_shape),
                                            vision_shape=dict(cfg.vision_shape))
    set_experts_implementation(model, cfg.experts_implementation)
    family = family_class(model.config.model_type)(model, processor)
    tiers = {t: family.tier_kwargs(v) for t, v in cfg.model.tiers.items()}
    space = KnobSpace.for_backbone(tuple(tiers), KnobHooks(model, family=family))
    prompt = cfg.model.prompt or family.prompt
    scene = synth_token_labels(cfg.data.seed) if cfg.data.name == "synth_vqa" and cfg.scene_weight else None
    loader = torch.utils.data.DataLoader(splits["train"], batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=Collate(processor, prompt, tiers, scene_labels=scene))
    full_tier = space.tiers[-1]
    evaluate = lambda samples: torch.utils.data.DataLoader(
        samples, batch_size=32, collate_fn=Collate(processor, prompt, tiers, fixed_tier=full_tier))
    module = PretrainVLM(model, space, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.trainer.max_steps,
                         cfg.random_config_prob, cfg.scene_weight, cfg.vision_warmup_steps)
    trainer = hydra.utils.instantiate(cfg.trainer, max_epochs=-1)
    trainer.fit(module, loader, evaluate(splits["val"][: cfg.val_limit]))
    test = teacher_forced_accuracy(module, evaluate(splits["test"][: cfg.test_limit]))
    out = Path(cfg.output_dir)
    save(model, processor, out, {
        "command": " ".join(["python -m lvlm_ctrl.pretrain_vlm"] + sys.argv[1:]),
        "seed": cfg.seed, "steps": trainer.global_step, "wall_s": round(time.time() - start, 1),
        "test_teacher_forced_acc": test, "config": OmegaConf.to_container(cfg, resolve=True),
    })
    print(f"test accuracy (full configuration, teacher-forced): {test}; saved to {out}")
    if cfg.install:
        shutil.copytree(out, ASSETS / cfg.model.asset, dirs_exist_ok=True)
        print(f"installed into {ASSETS / cfg.model.asset}")
    return test["all"]


if __name__ == "__main__":
    main()
