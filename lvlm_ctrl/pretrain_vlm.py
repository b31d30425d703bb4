"""Pretrain a tiny real-family MoE VLM (build_tiny's architecture, word-level tokenizer) on a dataset,
with Lightning: the synth-VQA testbed's backbone (issue 17).

    python -m lvlm_ctrl.pretrain_vlm                  # tiny Qwen3-VL-MoE on synth_vqa, <= 40 min on 2 cores (max_time 36)
    python -m lvlm_ctrl.pretrain_vlm install=true     # also copies it into lvlm_ctrl/assets/tiny_qwen3_vl_moe

Every batch goes through the family's own processor (dynamic resolution: each image as many vision
tokens as its size needs, up to the tier's cap) and the model's own forward with language-model
labels on the answer's tokens and the end of turn, so answers of several words are learned as the
backbone generates them. The tier is drawn per batch; a fraction `random_config_prob` of the batches
run a random configuration of the knob space (random blocks skipped, random top_k after a random
insertion) so that every configuration answers sensibly.

On synth-VQA, two phases: the vision tower alone first (`vision_warmup_steps`), with probes of the
scene under each of its tokens and of each object's shape from its tokens pooled; then the tower is
frozen (`freeze_vision`) and the decoder learns the answers on its cached output, with probes of
which image tokens the question is about on its hidden states after block `question_block` and of
the image's facts on its last prompt token after block `facts_block` (synth_targets.py; the probes
are not saved), and `family_weights` draws the families it learns slowest more often. From the
answers alone, a decoder of this width learned to read the image far too slowly for 40 minutes here.
"""

from __future__ import annotations

import inspect
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf

from lvlm_ctrl.backbone import backbone_dir, set_experts_implementation
from lvlm_ctrl.backbone.build_tiny import BUILDERS
from lvlm_ctrl.backbone.families import family_class
from lvlm_ctrl.backbone.hooks import KnobHooks
from lvlm_ctrl.data import question_family
from lvlm_ctrl.data.synth_targets import FACT_CLASSES, SCENE_CLASSES, question_labels, scene_facts, scene_labels
from lvlm_ctrl.data.synth_vqa import FAMILIES
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.knobs import Knobs, KnobSpace
from lvlm_ctrl.pretrain import save, training_knobs, warmup_cosine
from lvlm_ctrl.pretrain_batches import Collate, SizeBuckets, VisionCache, family_sampler, image_areas, last_prompt_token


class PretrainVLM(L.LightningModule):
    def __init__(self, model, space: KnobSpace, lr: float, weight_decay: float, warmup_steps: int,
                 total_steps: int, random_config_prob: float, scene_weight: float = 0.0,
                 vision_warmup_steps: int = 0, question_weight: float = 0.0, question_block: int = 3,
                 cache: VisionCache | None = None, facts_weight: float = 0.0, facts_block: int = 8):
        super().__init__()
        self.model, self.space = model, space
        self.hooks = KnobHooks(model)
        encoder = model.base_model.get_image_features
        self.vision_params = set(inspect.signature(encoder).parameters) - {"kwargs"}
        hidden = model.config.get_text_config().hidden_size
        # Training-only probes (synth_targets.py), dropped when saved: the scene under each vision
        # token, so the vision tower gets a direct signal from every sample (the toy's lesson: from the
        # answer alone, it learns to look only after hundreds of steps); and, on the decoder's image
        # tokens after block `question_block`, whether the token shows what the question asks about
        self.scene_weight, self.vision_warmup_steps = scene_weight, vision_warmup_steps
        self.scene_head = torch.nn.Linear(hidden, sum(SCENE_CLASSES))
        self.object_head = torch.nn.Linear(hidden, SCENE_CLASSES[1] - 1)
        self.question_weight, self.question_block = question_weight, question_block
        self.question_head = torch.nn.Linear(hidden, 1)
        # and on the last prompt token after block `facts_block`, the image's facts every answer is
        # made of: the decoder gathers the scene there before the question picks from it
        self.facts_weight, self.facts_block = facts_weight, facts_block
        self.facts_head = torch.nn.Linear(hidden, sum(FACT_CLASSES.values()))
        self.image_token_id = model.config.image_token_id
        self.cache = cache
        self.lr, self.weight_decay, self.warmup_steps, self.total_steps = lr, weight_decay, warmup_steps, total_steps
        self.random_config_prob = random_config_prob
        self._vision_acc, self._facts_acc = defaultdict(list), defaultdict(list)

    def _image(self, batch):
        """The vision encoder's output for the batch: run on its pixels, or, once the tower is frozen,
        read from the cache (the images it lacks encoded first, without gradients)."""
        encode = self.model.base_model.get_image_features
        if "keys" not in batch:
            vision = {k: v for k, v in batch["inputs"].items() if k in self.vision_params}
            return encode(**vision, return_dict=True)
        if batch["new"] is not None:
            with torch.no_grad():
                out = encode(**batch["new"]["inputs"], return_dict=True)
            self.cache.put(batch["new"]["keys"], batch["new"]["inputs"]["image_grid_thw"], out)
            self._output_type = type(out)
        return self.cache.output(batch["keys"], self._output_type)

    def _forward(self, batch, knobs: Knobs, grab_blocks: tuple[int, ...] = ()):
        """-> (logits, the vision encoder's output, {block: its hidden states} for `grab_blocks`) of
        the batch at `knobs`."""
        # the forward keeps the image grid (its multimodal rope positions read it, as in serving,
        # where Backbone.encode computes them from the same inputs) but not the pixels
        inputs = {k: v for k, v in batch["inputs"].items() if not k.startswith("pixel_values")}
        grabbed = {}

        def keep(block):
            return lambda _m, _a, out: grabbed.__setitem__(block, out[0] if isinstance(out, tuple) else out)
        grabs = [self.hooks.blocks[b].register_forward_hook(keep(b)) for b in grab_blocks]
        try:
            with self.hooks.apply(knobs):
                # the vision encoder once, its output given to the forward as Backbone.prefill does
                image = self._image(batch)
                logits = self.model(**inputs, mm_encoder_outputs={"image": image}, use_cache=False).logits
        finally:
            for grab in grabs:
                grab.remove()
        return logits, image, grabbed

    def _loss(self, batch, knobs: Knobs):
        full = self.space.full()
        # the decoder's probes read the blocks as the full configuration runs them (all kept, default top_k)
        probe = self.training and (knobs.top_k, knobs.num_blocks) == (full.top_k, full.num_blocks)
        ask = probe and self.question_weight and "asked" in batch
        facts = probe and self.facts_weight and "facts" in batch
        logits, image, hidden = self._forward(batch, knobs, tuple(b for b, on in ((self.question_block, ask),
                                                                                   (self.facts_block, facts)) if on))
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        # teacher-forced exact match: every answer token and the end of turn right
        wrong = (logits.argmax(-1) != labels) & (labels != -100)
        if self.training and self.scene_weight and "scene" in batch:
            scene, _ = self._scene_loss(image.pooler_output, batch["scene"])
            self.log("train/scene_loss", scene, batch_size=len(labels))
            loss = loss + self.scene_weight * scene
        if ask:
            image_tokens = batch["inputs"]["input_ids"] == self.image_token_id
            asked = F.binary_cross_entropy_with_logits(
                self.question_head(hidden[self.question_block][image_tokens]).squeeze(-1), batch["asked"])
            self.log("train/question_loss", asked, batch_size=len(labels))
            loss = loss + self.question_weight * asked
        if facts:
            last = last_prompt_token(batch["labels"])
            states = hidden[self.facts_block][torch.arange(len(last), device=last.device), last]
            fact, acc = self._facts_loss(self.facts_head(states), batch["facts"])
            self.log("train/facts_loss", fact, batch_size=len(labels))
            for k, v in acc.items():
                self._facts_acc[k].append(v.item())
            loss = loss + self.facts_weight * fact
        return loss, ~wrong.any(-1)

    @staticmethod
    def _facts_loss(out, target):
        """-> (the loss over the colours shown, one flag each, and a class per fact (FACT_CLASSES);
        the accuracy per fact, the colours shown right only when every flag is)."""
        n = FACT_CLASSES["shown"]
        loss = F.binary_cross_entropy_with_logits(out[:, :n], target[:, :n].float())
        acc = {"shown": ((out[:, :n] > 0) == target[:, :n].bool()).all(-1).float().mean()}
        start = n
        for j, (name, classes) in enumerate(list(FACT_CLASSES.items())[1:]):
            loss = loss + F.cross_entropy(out[:, start:start + classes], target[:, n + j])
            acc[name] = (out[:, start:start + classes].argmax(-1) == target[:, n + j]).float().mean()
            start += classes
        return loss, acc

    def _scene_loss(self, per_image, target):
        """-> (the scene probe's loss, its accuracy per target: colour on every token, shape on the
        tokens inside an object and on each object's pooled tokens, digit on the box's token), so the
        vision warm-up shows what it learned."""
        tokens = torch.cat(list(per_image))
        out = self.scene_head(tokens)
        c, sh, _ = SCENE_CLASSES
        # an object's tokens mean-pooled, as attention to them would read them (synth_targets.scene_labels)
        image = torch.repeat_interleave(torch.arange(len(per_image), device=tokens.device),
                                        torch.tensor([len(f) for f in per_image], device=tokens.device))
        shown = target[:, 3] >= 0
        objects, which = torch.unique(torch.stack([image[shown], target[shown, 3]]), dim=1, return_inverse=True)
        count = objects.shape[1]  # distinct (image, object) pairs
        pooled = torch.zeros(count, tokens.shape[-1], device=tokens.device).index_add(0, which, tokens[shown])
        pooled = pooled / torch.bincount(which, minlength=count)[:, None]
        object_shape = torch.zeros(count, dtype=torch.long, device=tokens.device).scatter(
            0, which, target[shown, 4])
        heads = {"colour": (out[:, :c], target[:, 0]), "shape": (out[:, c:c + sh], target[:, 1]),
                 "digit": (out[:, c + sh:], target[:, 2]), "object_shape": (self.object_head(pooled), object_shape)}
        loss = sum(F.cross_entropy(o, t, ignore_index=-100) for o, t in heads.values())
        with torch.no_grad():
            keep = {"colour": torch.ones_like(shown), "shape": target[:, 1] != sh - 1, "digit": target[:, 2] != -100,
                    "object_shape": torch.ones_like(object_shape, dtype=torch.bool)}
            acc = {k: (o.argmax(-1) == t)[keep[k]].float().mean() for k, (o, t) in heads.items()}
        return loss, acc

    def training_step(self, batch, _):
        if self.global_step < self.vision_warmup_steps and "scene" in batch:
            # the vision tower learns the scene by itself first: no decoder pass, a fraction of a step
            image = self._image(batch)
            loss, acc = self._scene_loss(image.pooler_output, batch["scene"])
            self.log("train/vision_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
            self.log_dict({f"train/vision_{k}_acc": v for k, v in acc.items()}, batch_size=len(batch["labels"]))
            for k, v in acc.items():
                self._vision_acc[k].append(v.item())
            if (self.global_step + 1) % 100 == 0:  # the warm-up's curve in the log (no validation runs in it)
                print(f"vision step {self.global_step + 1}: scene probe accuracy over the last 100 steps "
                      + " ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in self._vision_acc.items()), flush=True)
                self._vision_acc.clear()
            return loss
        if self.cache is not None and not self.cache.active:
            # from here the tower is frozen and the decoder reads its cached output (VisionCache)
            self.model.base_model.visual.requires_grad_(False)
            self.cache.active = True
        knobs = training_knobs(self.space, self.hooks, batch["tier"], self.random_config_prob)
        loss, correct = self._loss(batch, knobs)
        self.log_dict({"train/loss": loss, "train/acc": correct.float().mean()}, prog_bar=True,
                      batch_size=len(correct))
        if (self.global_step + 1) % 100 == 0 and self._facts_acc:  # the facts probe's curve in the log
            print(f"step {self.global_step + 1}: facts probe accuracy over the last 100 steps "
                  + " ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in self._facts_acc.items()), flush=True)
            self._facts_acc.clear()
        return loss

    def validation_step(self, batch, _):
        if self.global_step < self.vision_warmup_steps:
            return  # the decoder has not trained yet: nothing to measure, and the time goes to steps
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
            batch = move_data_to_device(batch, module.device)
            _, correct = module._loss(batch, module.space.full())
            for fam, c in zip(batch["families"], correct.tolist()):
                by[fam].append(c)
    scores = {fam: round(sum(cs) / len(cs), 4) for fam, cs in sorted(by.items())}
    scores["all"] = round(sum(map(sum, by.values())) / sum(map(len, by.values())), 4)
    return scores


def checked_weights(option: str, given, names, kinds: tuple[str, str], refuse: bool = False,
                    fix: str = "") -> dict:
    """{name: weight} from an option that weighs some of `names` (one left out weighs 1), or a
    one-line error for an unknown name, a negative or non-number weight, all weights zero, or the
    option given where `refuse` holds."""
    weights = dict(given or {})
    if set(weights) - set(names) or any(not isinstance(v, (int, float)) or v < 0 for v in weights.values()) \
            or (weights and (refuse or not sum(weights.get(n, 1.0) for n in names))):
        raise UserError(f"{option}={weights}: give {kinds[0]} of {', '.join(names)} non-negative numbers, not all "
                        f"zero (a {kinds[1]} left out weighs 1){fix}")
    return weights


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
    synth = cfg.data.name == "synth_vqa"
    if not synth and (cfg.scene_weight or cfg.question_weight or cfg.facts_weight or cfg.family_weights):
        raise UserError(f"scene_weight / question_weight / facts_weight probe what synth_vqa's generator knows, and "
                        f"data={cfg.data.name} has no such targets: pass scene_weight=0 question_weight=0 facts_weight=0 "
                        "family_weights=null freeze_vision=false")
    if cfg.freeze_vision and not (cfg.scene_weight and cfg.vision_warmup_steps > 0):
        raise UserError("freeze_vision=true freezes the vision tower after its warm-up on the scene probe, and "
                        f"scene_weight={cfg.scene_weight} vision_warmup_steps={cfg.vision_warmup_steps} train none: "
                        "give both > 0, or pass freeze_vision=false")
    weights = checked_weights("tier_weights", cfg.tier_weights, list(cfg.model.tiers), ("tiers", "tier"))
    # batches of like-sized images (SizeBuckets) are a sampler of their own: the two do not combine
    by_family = checked_weights("family_weights", cfg.family_weights, FAMILIES, ("question families", "family"),
                                refuse=cfg.bucket_by_size, fix=", with bucket_by_size=false")
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.threads)
    splits = {s: hydra.utils.instantiate(cfg.data, split=s, limit=None).samples for s in ("train", "val", "test")}
    families = [question_family(s.sample_id) for s in splits["train"]]
    words = sorted({w for v in splits.values() for s in v for text in (s.question, *s.answers)
                    for w in text.lower().replace("?", " ").split()})
    model, processor = builder(seed=cfg.seed, words=words, text_shape=dict(cfg.text_shape),
                                            vision_shape=dict(cfg.vision_shape))
    set_experts_implementation(model, cfg.experts_implementation)
    family = family_class(model.config.model_type)(model, processor)
    tiers = {t: family.tier_kwargs(v) for t, v in cfg.model.tiers.items()}
    hooks = KnobHooks(model, family=family)
    space = KnobSpace.for_backbone(tuple(tiers), hooks)
    for option in ("question_block", "facts_block"):
        if not 0 <= cfg[option] < len(hooks.blocks):
            raise UserError(f"{option}={cfg[option]}: the probes read a decoder block, 0 to {len(hooks.blocks) - 1}")
    prompt = cfg.model.prompt or family.prompt
    scene = scene_labels(cfg.data.seed) if cfg.scene_weight else None
    asked = question_labels(cfg.data.seed) if cfg.question_weight else None
    cache = VisionCache() if cfg.freeze_vision else None
    collate = Collate(processor, prompt, tiers, scene_labels=scene, question_labels=asked, cache=cache,
                      tier_weights=weights, scene_facts=scene_facts(cfg.data.seed) if cfg.facts_weight else None)
    if by_family:
        loader = torch.utils.data.DataLoader(splits["train"], batch_size=cfg.batch_size, drop_last=True,
                                             sampler=family_sampler(families, by_family, cfg.seed), collate_fn=collate)
    elif cfg.bucket_by_size:
        loader = torch.utils.data.DataLoader(splits["train"], collate_fn=collate, batch_sampler=SizeBuckets(
            image_areas(splits["train"]), cfg.batch_size, seed=cfg.seed))
    else:
        loader = torch.utils.data.DataLoader(splits["train"], batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                             collate_fn=collate)
    full_tier = space.tiers[-1]
    evaluate = lambda samples: torch.utils.data.DataLoader(
        samples, batch_size=32, collate_fn=Collate(processor, prompt, tiers, fixed_tier=full_tier, cache=cache))
    module = PretrainVLM(model, space, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.trainer.max_steps,
                         cfg.random_config_prob, cfg.scene_weight, cfg.vision_warmup_steps, cfg.question_weight,
                         cfg.question_block, cache, cfg.facts_weight, cfg.facts_block)
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
        shutil.copytree(out, backbone_dir(asset=cfg.model.asset), dirs_exist_ok=True)
        print(f"installed into {backbone_dir(asset=cfg.model.asset)}")
    return test["all"]


if __name__ == "__main__":
    main()
