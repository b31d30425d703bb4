"""The synth-VQA testbed's backbone: its word-level tokenizer, the scene targets under each vision
token, and a real (short) pretraining run whose checkpoint the serving path loads and answers with."""

import json

import numpy as np
import pytest
import torch

from lvlm_ctrl.backbone.build_tiny import QWEN_SPECIALS, qwen3_vl_moe, word_tokenizer
from lvlm_ctrl.backbone.families import family_class
from lvlm_ctrl.data import build_dataset, question_family
from lvlm_ctrl.data.synth_targets import asked, question_labels, scene_facts, scene_labels, token_centres
from lvlm_ctrl.data.synth_vqa import COLORS, SHAPES, generate, inside, scene_of, vocabulary
from lvlm_ctrl.knobs import Knobs
from tests.conftest import error_line, run_cli


def test_word_tokenizer_gives_one_token_per_word_and_decodes_answers():
    tok = word_tokenizer(QWEN_SPECIALS, vocabulary())
    prompt = "<|vision_start|><|image_pad|><|vision_end|>what colors are the shapes in rainbow order?"
    assert tok.tokenize(prompt)[3:] == ["what", "colors", "are", "the", "shapes", "in", "rainbow", "order", "?"]
    ids = tok("red green blue<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "red green blue"
    assert tok.convert_ids_to_tokens(tok("zebra")["input_ids"]) == ["<unk>"]


def test_inside_matches_the_drawn_shapes(tmp_path):
    """synth_vqa.inside agrees with Scene.draw's pixels: the points it calls inside an object have
    the object's colour."""
    generate(tmp_path / "val", "val", 0, images=8)
    checked = 0
    for s in build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples[::3]:
        img = np.asarray(s.load_image())
        for colour, shape, cx, cy, r in scene_of(s.image_path).objects:
            for dx in np.linspace(-r, r, 9):
                for dy in np.linspace(-r, r, 9):
                    if inside(shape, dx, dy, 0.9 * r):
                        assert tuple(img[int(cy + dy), int(cx + dx)]) == COLORS[colour]
                        checked += 1
    assert checked > 100


def test_token_targets_follow_the_processors_token_order(tmp_path):
    """Each merged vision token's colour target is the colour at the centre of that token's pixels
    as the processor laid them out (merge units in raster order): a transposed or column-major
    order would put the targets on other tokens."""
    generate(tmp_path / "val", "val", 0, images=6)
    model, processor = qwen3_vl_moe(words=vocabulary())
    ip = processor.image_processor
    family = family_class("qwen3_vl_moe")(model, processor)
    labels = scene_labels(seed=0)
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    hits = total = 0
    for s in build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples[::3]:
        out = processor(images=[s.load_image()], text=[family.prompt.format(question=s.question)],
                        return_tensors="pt", **family.tier_kwargs(256))
        _, h, w = out["image_grid_thw"][0].tolist()
        target = labels(s.image_path, h, w)
        assert target.shape == ((h // 2) * (w // 2), 5) and (target[:, 2] >= 0).sum() == 1
        # merge unit k = patches 4k..4k+3; the top-left patch's last pixel touches the unit's centre
        patches = out["pixel_values"].reshape(-1, 4, 3, 2, 16, 16)[:, 0, :, 0, 15, 15].numpy()
        rgb = (patches * std + mean) * 255
        for k in torch.nonzero(target[:, 0] < len(COLORS)).flatten().tolist():
            total += 1
            hits += np.abs(rgb[k] - COLORS[list(COLORS)[target[k, 0]]]).max() < 40
    assert total > 20 and hits / total > 0.9


def test_object_targets_show_each_object_with_its_shape(tmp_path):
    """The pooled shape probe's targets: at every grid size each object of the scene has tokens,
    carrying its shape, centred on it (its tokens' mean centre within its radius and half a token), and the object
    tokens of the low tier are no more than of the high (an index shifted by one, or a shape taken
    from another object, fails)."""
    generate(tmp_path / "val", "val", 0, images=12)
    labels = scene_labels(seed=0)
    for s in build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples[::3]:
        scene = scene_of(s.image_path)
        shown = {}
        for grid in ((8, 8), (16, 12), (32, 32)):
            target = labels(s.image_path, *grid)
            x, y, rows, cols = token_centres(scene, *grid)
            for i, (_, shape, cx, cy, r) in enumerate(scene.objects):
                mine = target[:, 3] == i
                near = r + 0.5 * max(scene.width / cols, scene.height / rows)
                assert mine.any() and (target[mine, 4] == SHAPES.index(shape)).all()
                assert abs(x.flatten()[mine].mean() - cx) <= near and abs(y.flatten()[mine].mean() - cy) <= near
            shown[grid] = int((target[:, 3] >= 0).sum())
        assert shown[(8, 8)] <= shown[(32, 32)]


def test_training_forward_is_the_serving_forward(tmp_path):
    """The logits training reads at the answer's first position are the ones Backbone.generate
    decodes from (same positions, masks and deepstack), at the full and at a reduced configuration."""
    from lvlm_ctrl.backbone import Backbone
    from lvlm_ctrl.pretrain_batches import Collate
    from lvlm_ctrl.pretrain_vlm import PretrainVLM

    generate(tmp_path / "val", "val", 0, images=2)
    s = build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples[3]
    model, processor = qwen3_vl_moe(words=vocabulary(), seed=1)
    backbone = Backbone(model, processor, {"low": 16, "high": 256}, None, None, 4, name="t")
    module = PretrainVLM(model, backbone.space, 1e-3, 0.0, 1, 10, 0.0)
    tiers = {t: backbone.family.tier_kwargs(v) for t, v in backbone.tier_sizes.items()}
    for knobs in (backbone.space.full(), Knobs("low", 2, 5, 13)):
        batch = Collate(processor, backbone.prompt, tiers, fixed_tier=knobs.tier)([s])
        n = int((batch["labels"] != -100).sum())
        with torch.no_grad():
            trained = module._forward(batch, knobs)[0][0, -(n + 1)]
            prompt = backbone.encode([s.load_image()], [s.question], knobs.tier)
            with backbone.hooks.apply(knobs):
                served = backbone.prefill(prompt, backbone.vision(prompt), logits_to_keep=1).logits[0, -1]
        assert torch.allclose(trained, served, atol=1e-4)


def test_asked_objects_hold_the_answer(tmp_path):
    """The objects the question probe marks are the ones the reference answer is about: a colour
    question's object is the biggest and has the answer's colour, a digit or yes/no question's the
    box, the other families every object."""
    generate(tmp_path / "val", "val", 0, images=40)
    seen = set()
    for s in build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples:
        scene, answer = scene_of(s.image_path), s.answers[0]
        picks = asked(scene, s.question)
        family = s.sample_id.rsplit("-", 1)[1]
        seen.add(family)
        if family in ("digit", "yesno"):
            assert picks == "box"
        elif family == "colour":
            radii = [o[4] for o in scene.objects]
            assert len(picks) == 1 and radii[picks[0]] >= 1.5 * max(r for i, r in enumerate(radii) if i != picks[0]) - 1e-9
            assert scene.objects[picks[0]][0] == answer
        else:
            assert picks == list(range(len(scene.objects)))
    assert seen == {"colour", "shape", "digit", "count", "order", "yesno"}
    labels = question_labels(seed=0)
    s = next(s for s in build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples if "number" in s.question)
    assert 1 <= labels(s.image_path, s.question, 4, 4).sum() <= labels(s.image_path, s.question, 32, 32).sum()


def test_cached_vision_batches_equal_the_processors(tmp_path):
    """Once the tower is frozen, a batch from the cache (text re-tokenised for each image's cached
    token count, the encoder's output read back) gives the same inputs and logits as one through the
    processor and the encoder, and a second epoch preprocesses no image."""
    from lvlm_ctrl.backbone import Backbone
    from lvlm_ctrl.pretrain_batches import Collate, VisionCache
    from lvlm_ctrl.pretrain_vlm import PretrainVLM

    generate(tmp_path / "val", "val", 0, images=3)
    samples = build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples[:6]
    model, processor = qwen3_vl_moe(words=vocabulary(), seed=1)
    backbone = Backbone(model, processor, {"low": 16, "high": 256}, None, None, 4, name="t")
    tiers = {t: backbone.family.tier_kwargs(v) for t, v in backbone.tier_sizes.items()}
    cache = VisionCache()
    module = PretrainVLM(model, backbone.space, 1e-3, 0.0, 1, 10, 0.0, cache=cache)
    knobs = backbone.space.full()
    plain = Collate(processor, backbone.prompt, tiers, fixed_tier="high", cache=cache)(samples)
    cache.active = True
    first = Collate(processor, backbone.prompt, tiers, fixed_tier="high", cache=cache)(samples)
    with torch.no_grad():
        expected = module._forward(plain, knobs)[0]
        module._forward(first, knobs)
        again = Collate(processor, backbone.prompt, tiers, fixed_tier="high", cache=cache)(samples)
        assert len(first["new"]["keys"]) == len({s.image_path for s in samples}) == 2 and again["new"] is None
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
            assert torch.equal(again["inputs"][key], plain["inputs"][key]), key
        assert torch.equal(again["labels"], plain["labels"])
        assert torch.allclose(module._forward(again, knobs)[0], expected, atol=1e-5)


def test_tier_weights_pick_how_often_a_batch_runs_each_tier(tmp_path):
    import random as rnd

    from lvlm_ctrl.pretrain_batches import Collate

    generate(tmp_path / "val", "val", 0, images=1)
    samples = build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples[:2]
    _, processor = qwen3_vl_moe(words=vocabulary(), seed=1)
    tiers = {"low": {}, "medium": {}, "high": {}}
    rnd.seed(0)
    only_low = Collate(processor, "{question}<|vision_start|><|image_pad|><|vision_end|>", tiers,
                       tier_weights={"medium": 0, "high": 0})
    assert {only_low(samples)["tier"] for _ in range(12)} == {"low"}
    alike = Collate(processor, "{question}<|vision_start|><|image_pad|><|vision_end|>", tiers)
    assert {alike(samples)["tier"] for _ in range(30)} == set(tiers)


def test_the_optimizer_trains_the_probe_head_too():
    from lvlm_ctrl.backbone.hooks import KnobHooks
    from lvlm_ctrl.knobs import KnobSpace
    from lvlm_ctrl.pretrain_vlm import PretrainVLM

    model, _ = qwen3_vl_moe(words=vocabulary())
    module = PretrainVLM(model, KnobSpace.for_backbone(("low", "high"), KnobHooks(model)), 1e-3, 0.0, 1, 10, 0.0, 0.5)
    (opt,), _ = module.configure_optimizers()
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in module.parameters()} == trained and id(module.scene_head.weight) in trained


def test_pretrain_vlm_writes_a_checkpoint_the_serving_path_answers_with(tmp_path):
    for split, n in (("train", 16), ("val", 4), ("test", 2)):
        generate(tmp_path / "data" / split, split, 0, images=n)
    out = tmp_path / "run"
    proc = run_cli("lvlm_ctrl.pretrain_vlm", f"data.root={tmp_path / 'data'}", "trainer.max_steps=3",
                   "vision_warmup_steps=1", "batch_size=4", "val_limit=4", "test_limit=6",
                   "trainer.val_check_interval=3", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = out / "tiny_qwen3_vl_moe"
    provenance = json.loads((ckpt / "provenance.json").read_text())
    assert provenance["steps"] == 3 and set(provenance["test_teacher_forced_acc"]) >= {"all", "digit", "order"}

    from lvlm_ctrl.backbone import load_backbone

    backbone = load_backbone(str(ckpt), tiers={"low": 16, "medium": 64, "high": 256}, name="tiny_qwen3_vl_moe")
    s = build_dataset("synth_vqa", split="test", root=str(tmp_path / "data")).samples[0]
    full = backbone.space.full()
    low, high = (backbone.generate([s.load_image()], [s.question], Knobs(t, full.insertion, full.top_k, full.num_blocks))
                 for t in ("low", "high"))
    assert low.vision_tokens[0] < high.vision_tokens[0] and high.output_tokens[0] >= 1


@pytest.mark.parametrize("args, message", [
    (["family=llama"], "family='llama': choose one of"),
    (["family=glm4v_moe"], "family=glm4v_moe: pretrain_vlm builds"),
    # the probes' targets exist on synth_vqa only, and freezing the tower needs its warm-up first
    (["data=easy_vqa"], "data=easy_vqa has no such targets: pass scene_weight=0 question_weight=0"),
    (["vision_warmup_steps=0"], "freeze_vision=true freezes the vision tower after its warm-up"),
    (["scene_weight=0"], "freeze_vision=true freezes the vision tower after its warm-up"),
    (["tier_weights={huge: 1}"], "tier_weights={'huge': 1}: give tiers of low, medium, high"),
    (["tier_weights={low: -1}"], "tier_weights={'low': -1}: give tiers of low, medium, high"),
    (["family_weights={count: -1}"], "'count': -1, 'order': 1.75, 'yesno': 1.0}: give question families of colour, shape"),
    (["family_weights={count: 0, order: 0, yesno: 0, colour: 0, shape: 0, digit: 0}"], "not all zero"),
    (["bucket_by_size=true"], "with bucket_by_size=false"),
    (["facts_block=16"], "facts_block=16: the probes read a decoder block, 0 to 15"),
    (["question_block=-1"], "question_block=-1: the probes read a decoder block, 0 to 15"),
])
def test_bad_options_are_one_line(tmp_path, args, message):
    bad = run_cli("lvlm_ctrl.pretrain_vlm", *args, f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and message in error_line(bad)
    assert not (tmp_path / "bad" / "tiny_qwen3_vl_moe").exists()


def test_size_buckets_batch_like_sizes_and_cover_every_sample_once():
    import random as rnd

    from lvlm_ctrl.pretrain_batches import SizeBuckets

    r = rnd.Random(0)
    areas = [r.choice([128 * 128, 256 * 256, 640 * 640]) * r.uniform(0.9, 1.1) for _ in range(1000)]
    sampler = SizeBuckets(areas, batch_size=16, pool=10, seed=3)
    first = list(sampler)
    flat = [i for b in first for i in b]
    assert len(first) == len(sampler) and all(len(b) == 16 for b in first)
    assert len(flat) == len(set(flat)) and len(flat) >= 1000 - 16 * 7  # each run drops its last partial batch
    def padding(batches):  # tokens a batch pads to (its largest image) over the tokens it holds
        return sum(max(areas[i] for i in b) * len(b) for b in batches) / sum(areas[i] for b in batches for i in b)
    shuffled = list(range(1000))
    r.shuffle(shuffled)
    assert padding(first) < 1.3
    assert padding([shuffled[k:k + 16] for k in range(0, 992, 16)]) > 2.0
    assert list(SizeBuckets(areas, 16, 10, seed=3)) == first and list(sampler) != first  # seeded, new each epoch


def test_scene_facts_make_every_answer(tmp_path):
    """The facts probe's targets hold what each family's reference answer is made of: the colours
    shown (as many as the objects), the biggest one's colour, the shape, the digit."""
    generate(tmp_path / "val", "val", 0, images=30)
    facts, n = scene_facts(seed=0), len(COLORS)
    for s in build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples:
        f = facts(s.image_path).tolist()
        shown = [c for c, on in zip(COLORS, f[:n]) if on]
        count, biggest, shape, digit = f[n:]
        expected = {"colour": list(COLORS)[biggest], "shape": SHAPES[shape], "digit": str(digit), "count": str(count),
                    "order": " ".join(shown), "yesno": "yes" if digit > 4 else "no"}
        assert s.answers[0] == expected[question_family(s.sample_id)] and len(shown) == count


def test_the_facts_probe_reads_the_last_prompt_token_and_trains_its_head(tmp_path):
    from lvlm_ctrl.backbone import Backbone
    from lvlm_ctrl.pretrain_batches import Collate, last_prompt_token
    from lvlm_ctrl.pretrain_vlm import PretrainVLM

    generate(tmp_path / "val", "val", 0, images=2)
    samples = build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples
    model, processor = qwen3_vl_moe(words=vocabulary(), seed=1)
    backbone = Backbone(model, processor, {"low": 16, "high": 256}, None, None, 4, name="t")
    tiers = {t: backbone.family.tier_kwargs(v) for t, v in backbone.tier_sizes.items()}
    batch = Collate(processor, backbone.prompt, tiers, fixed_tier="high", scene_facts=scene_facts(0))(samples)
    last, ids = last_prompt_token(batch["labels"]), batch["inputs"]["input_ids"]
    assert len({int(i) for i in last}) > 1  # rows of unlike lengths: the position is each row's own
    for row, s in enumerate(samples):
        assert processor.tokenizer.decode(ids[row, last[row] + 1:], skip_special_tokens=True) == s.answers[0]
        assert batch["labels"][row, last[row]] == -100 and batch["labels"][row, last[row] + 1] != -100
    module = PretrainVLM(model, backbone.space, 1e-3, 0.0, 1, 10, 0.0, facts_weight=1.0).train()
    module._loss(batch, backbone.space.full())[0].backward()
    assert module.facts_head.weight.grad.abs().sum() > 0
    # the probe's accuracy per fact (printed every 100 steps) is 1 for logits that name every fact
    from lvlm_ctrl.data.synth_targets import FACT_CLASSES

    target, n = batch["facts"], FACT_CLASSES["shown"]
    perfect = torch.cat([target[:, :n] * 20.0 - 10] + [torch.nn.functional.one_hot(target[:, n + j], c) * 20.0
                                                        for j, c in enumerate(list(FACT_CLASSES.values())[1:])], dim=-1)
    loss, acc = PretrainVLM._facts_loss(perfect, target)
    assert set(acc) == {"shown", "count", "biggest", "shape", "digit"} and all(v == 1 for v in acc.values())
    assert loss < 1e-3
    assert PretrainVLM._facts_loss(-perfect, target)[1]["shown"] == 0


def test_family_weights_draw_families_as_asked():
    from lvlm_ctrl.pretrain_batches import family_sampler

    families = ["colour", "digit", "count"] * 400
    drawn = [families[i] for i in family_sampler(families, {"colour": 0, "digit": 3}, seed=0)]
    assert len(drawn) == len(families) and "colour" not in drawn
    assert 2.4 < drawn.count("digit") / drawn.count("count") < 3.7
    assert list(family_sampler(families, {"digit": 3}, 0)) == list(family_sampler(families, {"digit": 3}, 0))
