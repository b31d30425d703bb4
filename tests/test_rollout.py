"""The rollout engine against batch-1 generation: the same answers, token for token, on the embedded
default and on a tiny random checkpoint of every other family (requests of different lengths in one
batch, so left padding and row selection are exercised)."""

import pytest

from lvlm_ctrl.backbone.hooks import _fusable
from lvlm_ctrl.backbone.rollout import Blocks, RolloutEngine
from tests.test_hooks import FAMILIES


def batch1_mismatches(backbone, images, questions, configs, **engine):
    """(sample, configuration, batch-1 tokens, engine tokens) wherever the two differ."""
    out = RolloutEngine(backbone, **engine).run(images, questions, [configs] * len(images))
    bad = []
    for i, (image, question) in enumerate(zip(images, questions)):
        for knobs in configs:
            alone = backbone.generate([image], [question], knobs).token_ids[0]
            gen, row = out[(i, knobs)]
            if gen.token_ids[row] != alone:
                bad.append((i, knobs, alone, gen.token_ids[row]))
    return bad


def spread(space):
    """Every tier and insertion point, each with the smallest and largest top_k and block count."""
    return [k for k in space.configurations()
            if k.top_k in (min(space.top_ks), max(space.top_ks))
            and k.num_blocks in (min(space.num_blocks_options(k.insertion)), space.num_layers)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, backbone, tiny_backbones, easy_samples):
    bb = backbone if request.param == "tiny_moe" else tiny_backbones(request.param)
    samples = easy_samples[:3]
    images = [s.load_image() for s in samples]
    if request.param != "tiny_moe":  # dynamic resolution: images of different sizes, so rows differ in length
        images = [images[0].resize((512, 384)), images[1].resize((256, 448)), images[2].resize((160, 160))]
    return request.param, bb, images, [s.question for s in samples]


def test_engine_answers_equal_batch1_generation(family):
    name, backbone, images, questions = family
    configs = spread(backbone.space)
    assert {k.insertion for k in configs} == set(backbone.space.insertions)
    assert batch1_mismatches(backbone, images, questions, configs) == [], name


def test_engine_continues_each_insertion_point_alone_or_merged_alike(backbone, easy_samples):
    """merge_below=0: every insertion point has a continuation of its own (a profile's case);
    the default merges the few rows of each into one from the smallest (GRPO groups' case)."""
    images, questions = [s.load_image() for s in easy_samples[:3]], [s.question for s in easy_samples[:3]]
    configs = spread(backbone.space)
    assert batch1_mismatches(backbone, images, questions, configs, merge_below=0) == []


def test_engine_runs_each_sample_only_at_its_own_configurations(backbone, easy_samples):
    """Samples asking for different configurations (and one asking twice) get exactly those."""
    space = backbone.space
    images, questions = [s.load_image() for s in easy_samples[:3]], [s.question for s in easy_samples[:3]]
    configs = [[space.full(), space.cheapest(), space.full()], [space.cheapest()], []]
    out = RolloutEngine(backbone, batch_size=2).run(images, questions, configs)
    assert set(out) == {(0, space.full()), (0, space.cheapest()), (1, space.cheapest())}
    for (i, knobs), (gen, row) in out.items():
        assert gen.token_ids[row] == backbone.generate([images[i]], [questions[i]], knobs).token_ids[0]


@pytest.mark.slow
def test_engine_equals_batch1_at_every_configuration_of_20_samples(backbone, easy_samples):
    """Issue 18's acceptance: all 225 configurations of the embedded default on 20 samples."""
    samples = easy_samples[:20]
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    assert batch1_mismatches(backbone, images, questions, backbone.space.configurations()) == []


def test_engine_runs_given_block_lists_as_generate_does(backbone, easy_samples):
    """Blocks (importance's "every block but i"): the engine's answers are generate's with that kept list."""
    full, n = backbone.space.full(), backbone.hooks.num_layers
    variants = [Blocks(full, tuple(j for j in range(n) if j != i)) for i in (1, 7, 15)]
    images, questions = [s.load_image() for s in easy_samples[:4]], [s.question for s in easy_samples[:4]]
    out = RolloutEngine(backbone).run(images, questions, [variants] * 4)
    for (i, key), (gen, row) in out.items():
        assert gen.token_ids[row] == backbone.generate([images[i]], [questions[i]], full, kept=list(key.kept)).token_ids[0]
    with pytest.raises(ValueError, match="must be kept"):
        RolloutEngine(backbone).run(images[:1], questions[:1], [[Blocks(full, tuple(range(1, n)))]])


def test_routing_is_padded_where_the_router_allows_it(backbone, tiny_backbones):
    """One experts call per block for every top_k on OLMoE and Qwen3-VL-MoE; ERNIE's MoE layer splits
    tokens by modality before its routers, so it runs once per top_k instead (both are checked
    against batch-1 generation above)."""
    def fused(bb):
        return [all(_fusable(m, r) for r in rs) for layers in bb.hooks.moe_layers for m, rs in layers]
    assert all(fused(backbone)) and all(fused(tiny_backbones("qwen3_vl_moe")))
    assert not any(fused(tiny_backbones("ernie4_5_vl_moe")))


def test_rows_that_start_alike_share_blocks_until_their_kept_lists_part():
    """shared_rows: rows 0-2 start alike (one sample, one p), row 3 elsewhere. Rows 0 and 1 keep
    blocks 0-1 at top_k 4 and part at block 2 (row 1 skips it); row 2 runs top_k 8 from the start."""
    import torch

    from lvlm_ctrl.backbone.hooks import shared_rows

    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    top_k = torch.tensor([[4] * 4, [4] * 4, [8] * 4, [4] * 4])
    shared = shared_rows(keep, top_k, torch.tensor([0, 0, 0, 1]))
    for j in (0, 1):  # rows 0 and 1 run once, on row 0
        reps, of = shared[j]
        assert reps.tolist() == [0, 2, 3] and of[1] == of[0]
    assert shared[2] is None  # row 1 skips it: every keeper differs
    assert shared[3] is None  # rows 0 and 1 have parted


def test_engine_kernel_runs_only_the_picks_that_carry_weight(backbone, easy_samples):
    """backbone/experts.py against transformers' grouped_mm: the same outputs where padding picks carry
    zero weight, and those picks never reach an expert (one whose weights are NaN stays out of the
    sum); the engine runs it and leaves the serving kernel in place."""
    import copy

    import torch
    from transformers.integrations.moe import grouped_mm_experts_forward

    from lvlm_ctrl.backbone.experts import NAME, picked_mm_experts_forward

    clean = next(m for m in backbone.model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts"))
    gen = torch.Generator().manual_seed(0)
    tokens, width = 7, 8
    hidden = torch.randn(tokens, clean.gate_up_proj.shape[-1 if not clean.is_transposed else -2], generator=gen)
    index = torch.randint(1, clean.num_experts, (tokens, width), generator=gen)
    weights = torch.rand(tokens, width, generator=gen)
    index[:, 5:], weights[:, 5:] = 0, 0.0  # top_k 5 padded to 8 with expert 0
    index[3], weights[3] = 0, 0.0  # a row that skips the block
    poisoned = copy.deepcopy(clean)
    with torch.no_grad():
        poisoned.gate_up_proj[0] = float("nan")
    want = grouped_mm_experts_forward(clean, hidden, index, weights)
    got = picked_mm_experts_forward(poisoned, hidden, index, weights)
    assert torch.allclose(got, want, atol=1e-6) and not got[3].any()

    seen = []
    spy = clean.register_forward_pre_hook(lambda m, a: seen.append(m.config._experts_implementation))
    try:
        RolloutEngine(backbone).run([easy_samples[0].load_image()], [easy_samples[0].question], [[backbone.space.full()]])
    finally:
        spy.remove()
    assert seen and set(seen) == {NAME}
    assert backbone.model.config.get_text_config()._experts_implementation != NAME
