"""Training batches for pretrain_vlm: a tier per batch, the family's own processor, labels on the
answer, the probes' targets, and the frozen vision tower's cached output."""

from __future__ import annotations

import random

import torch

from lvlm_ctrl.data import question_family


class VisionCache:
    """The frozen vision encoder's output per (image, tier): once the vision tower has learned the
    scene (vision_warmup_steps) it is frozen, and the decoder trains on its cached output, so that an
    epoch after the first neither preprocesses an image nor runs the encoder (most of a joint step's
    time). `active` is set when the tower freezes; before that, batches carry pixels as usual."""

    def __init__(self):
        self.active = False
        self.store: dict[tuple[str, str], tuple[torch.Tensor, dict]] = {}  # (image, tier) -> (grid, output)

    def put(self, keys: list, grids: torch.Tensor, output) -> None:
        for i, key in enumerate(keys):
            # the grid stays on the CPU, where Collate assembles the next batches' text
            self.store[key] = (grids[i].cpu(), {"pooler_output": output.pooler_output[i].detach(),
                                          "deepstack_features": [f[i].detach() for f in output.deepstack_features]})

    def output(self, keys: list, output_type):
        """The encoder's output for `keys`, as the encoder returns it (`output_type`)."""
        feats = [self.store[k][1] for k in keys]
        return output_type(pooler_output=tuple(f["pooler_output"] for f in feats),
                          deepstack_features=[tuple(f["deepstack_features"][j] for f in feats)
                                              for j in range(len(feats[0]["deepstack_features"]))])


class SizeBuckets(torch.utils.data.Sampler):
    """Training batches of images of like size. A batch runs at one tier and pads to its largest
    image, so at the high tier a batch drawn at random from synth-VQA's sizes is 2.3x the tokens it
    holds (1.04x sorted): shuffled, sorted by image area within runs of `pool` batches, the batches
    shuffled again (as transformers' group_by_length), reseeded each epoch."""

    def __init__(self, areas: list[int], batch_size: int, pool: int = 50, seed: int = 0):
        self.areas, self.batch_size, self.pool, self.seed, self.epoch = areas, batch_size, pool, seed, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order, size = torch.randperm(len(self.areas), generator=g).tolist(), self.batch_size
        batches = []
        for start in range(0, len(order), self.pool * size):
            run = sorted(order[start:start + self.pool * size], key=self.areas.__getitem__)
            batches += [run[i:i + size] for i in range(0, len(run) - size + 1, size)]  # full batches only
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]

    def __len__(self) -> int:
        return sum((min(self.pool * self.batch_size, len(self.areas) - s)) // self.batch_size
                   for s in range(0, len(self.areas), self.pool * self.batch_size))


def image_areas(samples) -> list[int]:
    """Each sample's image area in pixels (VQASample.image_size, once per image)."""
    seen: dict[str, int] = {}
    for s in samples:
        if s.image_path not in seen:
            width, height = s.image_size()
            seen[s.image_path] = width * height
    return [seen[s.image_path] for s in samples]


class Collate:
    """A batch at one tier: the processor's outputs for prompt + answer + end of turn, and labels on
    the answer's tokens and the end of turn only (rows are left-padded, so those are each row's last).
    With an active `cache`, only the images it lacks are preprocessed (`new`); the text is the
    processor's for the image tokens each cached image had."""

    def __init__(self, processor, prompt: str, tier_kwargs: dict[str, dict], fixed_tier: str | None = None,
                 scene_labels=None, question_labels=None, cache: VisionCache | None = None,
                 tier_weights: dict[str, float] | None = None, scene_facts=None):
        self.processor, self.prompt, self.tier_kwargs, self.fixed_tier = processor, prompt, tier_kwargs, fixed_tier
        self.tier_weights = [float((tier_weights or {}).get(t, 1.0)) for t in tier_kwargs]
        self.eos = processor.tokenizer.eos_token
        self.scene_labels, self.question_labels, self.cache = scene_labels, question_labels, cache
        self.scene_facts = scene_facts

    def __call__(self, samples):
        tier = self.fixed_tier or random.choices(list(self.tier_kwargs), weights=self.tier_weights)[0]
        tok = self.processor.tokenizer
        answers = [s.answers[0] + self.eos for s in samples]
        texts = [self.prompt.format(question=s.question) + a for s, a in zip(samples, answers)]
        batch = {"tier": tier, "families": [question_family(s.sample_id) for s in samples]}
        if self.cache is not None and self.cache.active:
            inputs, batch["keys"], batch["new"] = self._cached(samples, texts, tier)
        else:
            inputs = self.processor(images=[s.load_image() for s in samples], text=texts, return_tensors="pt",
                                    padding=True, **self.tier_kwargs[tier])
        labels = torch.full_like(inputs["input_ids"], -100)
        for row, a in enumerate(answers):
            n = len(tok(a, add_special_tokens=False)["input_ids"])
            labels[row, -n:] = inputs["input_ids"][row, -n:]
        batch.update(inputs=dict(inputs), labels=labels)
        grids = inputs["image_grid_thw"].tolist()
        if self.scene_labels is not None and "keys" not in batch:  # the tower trains only before the cache
            batch["scene"] = torch.cat([self.scene_labels(s.image_path, h, w) for s, (_, h, w) in zip(samples, grids)])
        if self.question_labels is not None:
            batch["asked"] = torch.cat([self.question_labels(s.image_path, s.question, h, w)
                                        for s, (_, h, w) in zip(samples, grids)])
        if self.scene_facts is not None:
            batch["facts"] = torch.stack([self.scene_facts(s.image_path) for s in samples])
        return batch

    def _cached(self, samples, texts, tier):
        keys = [(s.image_path, tier) for s in samples]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache.store))
        image_token = self.processor.image_token
        new = None
        if missing:
            new = self.processor(images=[samples[keys.index(k)].load_image() for k in missing],
                                 text=[image_token] * len(missing), return_tensors="pt", padding=True,
                                 **self.tier_kwargs[tier])
            new = {"keys": missing, "inputs": {k: v for k, v in new.items() if k in ("pixel_values", "image_grid_thw")}}
        grid_of = {k: g for k, g in zip(missing, new["inputs"]["image_grid_thw"])} if new else {}
        grids = torch.stack([grid_of[k] if k in grid_of else self.cache.store[k][0] for k in keys])
        merge = self.processor.image_processor.merge_size ** 2
        texts = [t.replace(image_token, image_token * int(g.prod() // merge)) for t, g in zip(texts, grids)]
        # the processor's own text path refuses image tokens without images: its tokenizer and token types
        inputs = dict(self.processor.tokenizer(texts, return_tensors="pt", padding=True))
        if "mm_token_type_ids" in self.processor.model_input_names:
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(inputs["input_ids"].tolist()))
        inputs["image_grid_thw"] = grids
        return inputs, keys, new


def last_prompt_token(labels: torch.Tensor) -> torch.Tensor:
    """Each row's last prompt position, the one its first answer token is read from."""
    return (labels != -100).int().argmax(-1) - 1


def family_sampler(families: list[str], weights: dict[str, float], seed: int):
    """Each epoch as many questions as the split holds, a question of family f drawn with weight
    weights.get(f, 1)."""
    return torch.utils.data.WeightedRandomSampler([float(weights.get(f, 1.0)) for f in families], len(families),
                                                  generator=torch.Generator().manual_seed(seed))
