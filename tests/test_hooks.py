"""The knob hooks on the real embedded backbone: every configuration, cache equality, restore."""

import torch

from lvlm_ctrl.knobs import Knobs


def snapshot(backbone):
    hooks = backbone.hooks
    return ([id(b) for b in hooks.decoder.layers], [b.self_attn.layer_idx for b in hooks.blocks],
            [r.top_k for r in hooks.routers], hooks.decoder.config.num_hidden_layers)


def test_cache_matches_no_cache_for_all_225_configurations(backbone, easy_samples):
    batch = easy_samples[:2]  # two questions of different lengths: left padding is exercised too
    images, questions = [s.load_image() for s in batch], [s.question for s in batch]
    configs = backbone.space.configurations()
    assert len(configs) == 225
    for knobs in configs:
        # two tokens: the prefill's and one decode step that reads the KV cache of every kept block
        cached = backbone.generate(images, questions, knobs, max_new_tokens=2, stop_at_eos=False)
        plain = backbone.generate(images, questions, knobs, max_new_tokens=2, stop_at_eos=False, use_cache=False)
        assert cached.token_ids == plain.token_ids, knobs


def test_full_configuration_equals_untouched_model(backbone, easy_samples):
    model, full = backbone.model, backbone.space.full()
    for s in easy_samples[:4]:
        enc = backbone.encode([s.load_image()], [s.question], full.tier)
        ref = model.generate(**enc, max_new_tokens=4, do_sample=False, eos_token_id=backbone.eos_id,
                             pad_token_id=backbone.tokenizer.pad_token_id)
        ref_tokens = ref[0, enc["input_ids"].shape[1]:].tolist()
        ours = backbone.generate([s.load_image()], [s.question], full, max_new_tokens=4).token_ids[0]
        assert ours == ref_tokens[: len(ours)] and (ours[-1] == backbone.eos_id or len(ours) == 4)


def test_restore_after_request_and_after_error(backbone, easy_samples):
    before = snapshot(backbone)
    s = easy_samples[0]
    backbone.generate([s.load_image()], [s.question], Knobs("low", 2, 4, 13))
    assert snapshot(backbone) == before
    try:
        with backbone.hooks.apply(Knobs("medium", 3, 5, 14)):
            assert backbone.hooks.decoder.config.num_hidden_layers == 14
            assert [r.top_k for r in backbone.hooks.routers if r is not None][:4] == [8, 8, 8, 5]
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert snapshot(backbone) == before


def test_kept_blocks_follow_importance_and_keep_prefix(backbone):
    hooks = backbone.hooks
    for p in backbone.space.insertions:
        for n in backbone.space.num_blocks_options(p):
            kept = hooks.kept_blocks(p, n)
            assert kept[:p] == list(range(p)) and len(kept) == n and kept == sorted(kept)
            dropped = set(range(hooks.num_layers)) - set(kept)
            rank = {b: i for i, b in enumerate(hooks.ranking)}
            # nothing dropped ranks above anything kept after p
            assert all(rank[d] > rank[k] for d in dropped for k in kept if k >= p)


def test_latency_token_is_hidden_state_after_block_p_minus_1(backbone, easy_samples):
    s = easy_samples[3]
    for p in (1, 3, 5):
        knobs = Knobs("high", p, 8, 16)
        gen = backbone.generate([s.load_image()], [s.question], knobs, capture=True)
        enc = backbone.encode([s.load_image()], [s.question], "high")
        with torch.inference_mode():
            out = backbone.model(inputs_embeds=backbone.embed(enc), attention_mask=enc["attention_mask"],
                                 output_hidden_states=True)
        # hidden_states[0] is the embedding output, [p] the output of block p-1
        assert torch.allclose(gen.latency_token, out.hidden_states[p][:, -1], atol=1e-5)


def test_staged_decision_in_one_pass_equals_static_configuration(backbone, easy_samples):
    """Stage 2 decides after block p-1 of the serving prefill; the result equals running the chosen
    configuration statically, and the decision saw the same latency token."""
    s = easy_samples[5]
    seen = []
    for tier, p, k, n in [("low", 1, 4, 12), ("medium", 2, 6, 14), ("high", 5, 8, 16), ("high", 3, 5, 15)]:
        def decide(token, k=k, n=n):
            seen.append(token.clone())
            return k, n
        staged = backbone.generate([s.load_image()], [s.question], Knobs(tier, p, 8, 16), decide=decide,
                                   max_new_tokens=3, stop_at_eos=False)
        static = backbone.generate([s.load_image()], [s.question], Knobs(tier, p, k, n), capture=True,
                                   max_new_tokens=3, stop_at_eos=False)
        assert staged.knobs == Knobs(tier, p, k, n)
        assert staged.token_ids == static.token_ids
        assert torch.allclose(seen[-1], static.latency_token)
    assert snapshot(backbone)[3] == 16
