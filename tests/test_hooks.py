"""The knobs on every supported family, against the model's own forward: the embedded default and a
tiny random checkpoint of every other family, built by lvlm_ctrl.backbone.build_tiny (real
transformers classes, the family's own processor)."""

import pytest
import torch

from lvlm_ctrl.backbone import conformance
from lvlm_ctrl.knobs import Knobs

FAMILIES = ["tiny_moe", "qwen3_vl_moe", "glm4v_moe", "internvl", "aria", "ernie4_5_vl_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, backbone, tiny_backbones, easy_samples):
    """(backbone, images, questions): two requests of different lengths (left padding exercised)."""
    bb = backbone if request.param == "tiny_moe" else tiny_backbones(request.param)
    images = [s.load_image() for s in easy_samples[:2]]
    if request.param != "tiny_moe":  # dynamic resolution: images big enough for every tier to differ
        images = [images[0].resize((512, 384)), images[1].resize((256, 448))]
    return bb, images, [s.question for s in easy_samples[:2]]


def test_full_configuration_equals_the_model_s_own_forward_and_generate(family):
    backbone, images, questions = family
    assert conformance.logit_difference(backbone, images, questions) <= 1e-5
    assert conformance.generate_mismatches(backbone, images, questions) == []


@pytest.mark.slow
def test_cache_matches_no_cache_for_every_configuration(family):
    backbone, images, questions = family
    configs = backbone.space.configurations()
    assert len(configs) == 75 * len(backbone.space.tiers)  # 225 with three tiers
    for knobs in configs:
        # two tokens: the prefill's and one decode step that reads the KV cache of every kept block
        cached = backbone.generate(images, questions, knobs, max_new_tokens=2, stop_at_eos=False)
        plain = backbone.generate(images, questions, knobs, max_new_tokens=2, stop_at_eos=False, use_cache=False)
        assert cached.token_ids == plain.token_ids, knobs


def test_every_knob_acts(family):
    """Each tier a distinct vision-token count; each top_k the number of experts every token is routed
    to in the blocks from p on (counted by a hook on the routers), the trained top_k before p."""
    backbone, images, questions = family
    counts = conformance.vision_tokens_per_tier(backbone, images[0], questions[0])
    assert len(set(counts.values())) == len(counts), counts
    trained = max(backbone.hooks.default_top_k)
    for k, routed in conformance.routed_experts(backbone, images[0], questions[0], insertion=2).items():
        assert routed and all(v == ({k} if i >= 2 else {trained}) for i, v in routed.items()), (k, routed)


def test_restore_after_request_and_after_error(family):
    backbone, images, questions = family
    before = conformance.state(backbone)
    for knobs in (Knobs(backbone.space.tiers[0], 2, 4, 13), backbone.space.cheapest()):
        backbone.generate(images[:1], questions[:1], knobs)
        assert conformance.same_state(conformance.state(backbone), before)
    backbone.generate(images[:1], questions[:1], Knobs(backbone.space.tiers[1], 3, 8, 16),
                      decide=lambda token, prompt: (5, 14))
    assert conformance.same_state(conformance.state(backbone), before)
    with pytest.raises(RuntimeError, match="boom"), backbone.hooks.apply(Knobs(backbone.space.tiers[1], 3, 5, 14)):
        assert backbone.hooks.decoder.config.num_hidden_layers == 14
        raise RuntimeError("boom")
    assert conformance.same_state(conformance.state(backbone), before)


def test_kept_blocks_follow_importance_and_keep_prefix_and_pinned(family):
    backbone = family[0]
    hooks = backbone.hooks
    for p in backbone.space.insertions:
        for n in backbone.space.num_blocks_options(p):
            kept = hooks.kept_blocks(p, n)
            assert kept[:p] == list(range(p)) and len(kept) == n and kept == sorted(kept)
            assert set(hooks.pinned) <= set(kept)
            dropped = set(range(hooks.num_layers)) - set(kept)
            rank = {b: i for i, b in enumerate(hooks.ranking)}
            # nothing dropped ranks above anything kept after p that is not pinned
            assert all(rank[d] > rank[k] for d in dropped for k in kept if k >= p and k not in hooks.pinned)


def test_qwen_deepstack_targets_are_pinned(tiny_backbones):
    backbone = tiny_backbones("qwen3_vl_moe")
    targets = len(backbone.model.config.vision_config.deepstack_visual_indexes)
    assert backbone.hooks.pinned == list(range(targets))
    # even the least important ranking keeps them
    backbone.hooks.ranking, saved = list(reversed(range(backbone.hooks.num_layers))), backbone.hooks.ranking
    try:
        assert set(range(targets)) <= set(backbone.hooks.kept_blocks(1, backbone.space.num_blocks_options(1)[0]))
    finally:
        backbone.hooks.ranking = saved


def test_latency_token_is_hidden_state_after_block_p_minus_1(family):
    backbone, images, questions = family
    tier = backbone.space.tiers[-1]
    for p in (1, 3, 5):
        gen = backbone.generate(images[:1], questions[:1], Knobs(tier, p, 8, 16), capture=True)
        prompt = backbone.encode(images[:1], questions[:1], tier)
        with torch.inference_mode():
            out = backbone.prefill(prompt, backbone.vision(prompt), output_hidden_states=True)
        # hidden_states[0] is the embedding output, [p] the output of block p-1
        assert torch.allclose(gen.latency_token, out.hidden_states[p][:, -1], atol=1e-5)


def test_staged_decision_in_one_pass_equals_static_configuration(family):
    """Stage 2 decides after block p-1 of the serving prefill; the result equals running the chosen
    configuration statically, and the decision saw the same latency token."""
    backbone, images, questions = family
    tiers, seen = backbone.space.tiers, []
    for tier, p, k, n in [(tiers[0], 1, 4, 12), (tiers[1], 2, 6, 14), (tiers[-1], 5, 8, 16), (tiers[-1], 3, 5, 15)]:
        def decide(token, _prompt, k=k, n=n):
            seen.append(token.clone())
            return k, n
        staged = backbone.generate(images[:1], questions[:1], Knobs(tier, p, 8, 16), decide=decide,
                                   max_new_tokens=3, stop_at_eos=False)
        static = backbone.generate(images[:1], questions[:1], Knobs(tier, p, k, n), capture=True,
                                   max_new_tokens=3, stop_at_eos=False)
        assert staged.knobs == Knobs(tier, p, k, n)
        assert staged.token_ids == static.token_ids
        assert torch.allclose(seen[-1], static.latency_token)
    assert backbone.hooks.decoder.config.num_hidden_layers == 16


def test_a_request_makes_no_deprecated_call(family):
    """transformers announces removals with FutureWarning / DeprecationWarning: our calls must not raise one."""
    import warnings

    backbone, images, questions = family
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        # numpy's, raised inside transformers' GLM-4V processor (np.zeros_like on a torch tensor), whatever
        # the caller passes
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
        backbone.generate(images, questions, backbone.space.cheapest(), max_new_tokens=2)
        backbone.generate(images, questions, backbone.space.full(), max_new_tokens=2, use_cache=False)
        backbone.generate(images[:1], questions[:1], backbone.space.full(), decide=lambda token, prompt: (5, 14))


def test_a_checkpoint_with_a_video_processor_loads_without_it(tiny_checkpoints, easy_samples, tmp_path):
    """A real Qwen3-VL checkpoint carries video_preprocessor_config.json, whose class needs torchvision
    (no CPU wheel on PyPI): the image processor and tokenizer load without it, and requests run."""
    import json
    import shutil

    from lvlm_ctrl.backbone import load_backbone

    root = tmp_path / "qwen_with_video"
    shutil.copytree(tiny_checkpoints("qwen3_vl_moe"), root)
    (root / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor", "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "size": {"shortest_edge": 4096, "longest_edge": 25165824}}))
    backbone = load_backbone(name="qwen", path=str(root), tiers={"low": 16, "medium": 64, "high": 256})
    assert backbone.processor.video_processor is None
    image = easy_samples[0].load_image().resize((256, 192))
    gen = backbone.generate([image], [easy_samples[0].question], backbone.space.full(), max_new_tokens=2)
    assert len(gen.token_ids[0]) >= 1
