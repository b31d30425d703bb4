"""GRPO pieces: sampling and masking, log-probabilities, advantages, the loss on a hand-checked case."""

import math

import pytest
import torch

from lvlm_ctrl.controllers.argmax_kernel import ArgmaxKernel
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.grpo.budgets import Fixed, Normal, Trace, Uniform
from lvlm_ctrl.grpo.loss import group_advantages, grpo_loss
from lvlm_ctrl.grpo.policy import HEADS, STAGE2, Decision, TwoStagePolicy
from lvlm_ctrl.grpo.rewards import RewardConfig, reward_components, total_reward
from lvlm_ctrl.knobs import KnobSpace

D = 16


def policy_and_inputs(batch=512, seed=0):
    torch.manual_seed(seed)
    space = KnobSpace()
    policy = TwoStagePolicy(space, d_model=D, hidden=32)
    lang = torch.randn(batch, D)
    tokens = torch.randn(batch, len(space.tiers), len(space.insertions), D)
    budget = torch.rand(batch) * 100 + 20
    return space, policy, lang, tokens, budget


def test_sampling_never_picks_invalid_num_blocks():
    space, policy, lang, tokens, budget = policy_and_inputs()
    for _ in range(5):
        d = policy.act(lang, tokens, budget)
        for knobs in d.knobs(space):
            space.validate(knobs)  # raises if num_blocks is invalid at p
        assert {int(p) for p in d.insertion} == {0, 1, 2, 3, 4}  # every insertion gets sampled
    at_p5 = d.num_blocks[d.insertion == 4]
    assert (at_p5 == 0).all()  # only one option (16 blocks) at p=5


def test_log_prob_is_sum_of_four_heads_and_normalised():
    space, policy, lang, tokens, budget = policy_and_inputs(batch=1)
    total = 0.0
    for t in range(3):
        for p in range(5):
            for k in range(5):
                for n in range(len(space.num_blocks_options(space.insertions[p]))):
                    d = Decision(*(torch.tensor([v]) for v in (t, p, k, n)))
                    logp, _ = policy.log_prob_and_entropy(lang, tokens, budget, d)
                    total += math.exp(logp.item())
    assert total == pytest.approx(1.0, abs=1e-5)  # a distribution over exactly the 225 configurations
    d = Decision(torch.tensor([0]), torch.tensor([4]), torch.tensor([0]), torch.tensor([1]))  # n invalid at p=5
    logp, _ = policy.log_prob_and_entropy(lang, tokens, budget, d)
    assert logp.item() < -1e6


def test_entropy_and_gradients_are_finite_with_masking():
    _, policy, lang, tokens, budget = policy_and_inputs(batch=64)
    d = policy.act(lang, tokens, budget)
    logp, ent = policy.log_prob_and_entropy(lang, tokens, budget, d)
    (logp.mean() + sum(e.mean() for e in ent.values())).backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    assert (ent["num_blocks"] >= 0).all() and torch.isfinite(ent["num_blocks"]).all()


def test_greedy_is_argmax_and_deterministic():
    _, policy, lang, tokens, budget = policy_and_inputs(batch=8)
    a = policy.act(lang, tokens, budget, greedy=True)
    b = policy.act(lang, tokens, budget, greedy=True)
    assert all(torch.equal(getattr(a, h), getattr(b, h)) for h in ("tier", "insertion", "top_k", "num_blocks"))


def test_stage2_warmup_samples_stage1_uniformly_and_trains_only_stage2():
    space, policy, lang, tokens, budget = policy_and_inputs(batch=3000)
    with torch.no_grad():
        policy.stage1[-1].bias[: len(space.tiers)] = torch.tensor([20.0, 0.0, 0.0])  # stage 1 all but sure: low
    assert (policy.act(lang, tokens, budget).tier == 0).float().mean() > 0.99
    d = policy.act(lang, tokens, budget, uniform_stage1=True)
    shares = torch.bincount(d.tier, minlength=3).float() / len(d.tier)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.04)
    logp, _ = policy.log_prob_and_entropy(lang, tokens, budget, d, heads=STAGE2)
    logp.mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.stage1.parameters())
    assert any(p.grad is not None and p.grad.any() for p in policy.stage2.parameters())


def test_argmax_kernel_matches_the_policy():
    """The serving path (numpy, budget folded into the first layers) decides as TwoStagePolicy.act does."""
    space, policy, lang, tokens, budget = policy_and_inputs(batch=300, seed=3)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(3)  # sharper logits, so that ties are rare and every option shows up
    greedy = policy.act(lang, tokens, budget, greedy=True)
    kernel = ArgmaxKernel(policy, D)
    got = []
    for i in range(len(lang)):
        b = float(budget[i])
        t, p = kernel.stage1(kernel.language((lang[i] * 3).numpy(), 3), b)  # a sum over 3 tokens
        k, n = kernel.stage2(tokens[i, t, p].numpy(), b, t, p, len(space.num_blocks_options(space.insertions[p])))
        got.append((t, p, k, n))
    assert got == list(zip(*(getattr(greedy, h).tolist() for h in HEADS)))
    assert len({g[1] for g in got}) > 1 and len({g[0] for g in got}) > 1


def test_stage2_knows_the_tier_even_when_the_latency_token_does_not():
    """The latency token barely encodes the tier, so stage 2 is told stage 1's decision."""
    space, policy, _, tokens, budget = policy_and_inputs(batch=4, seed=5)
    same = tokens[:, :1].expand_as(tokens)  # one token for every tier
    feat = policy.budget(budget)
    ins = torch.zeros(4, dtype=torch.long)
    low = policy.stage2_logits(same[:, 0, 0], feat, torch.zeros_like(ins), ins)[0]
    high = policy.stage2_logits(same[:, 0, 0], feat, torch.full_like(ins, len(space.tiers) - 1), ins)[0]
    assert not torch.allclose(low, high)


def test_num_blocks_is_chosen_per_top_k():
    """What fits a budget is a (top_k, num_blocks) pair: each top_k has its own num_blocks logits,
    masked alike, and log pi reads the row of the top_k taken."""
    space, policy, lang, tokens, budget = policy_and_inputs(batch=8, seed=3)
    feat = policy.budget(budget)
    tier, ins = torch.zeros(8, dtype=torch.long), torch.full((8,), 3, dtype=torch.long)  # p=4: 2 options
    _, blocks = policy.stage2_logits(tokens[:, 0, 3], feat, tier, ins)
    assert blocks.shape == (8, len(space.top_ks), space.max_block_options)
    assert not torch.allclose(blocks[:, 0, :2], blocks[:, 1, :2])
    assert (blocks[:, :, 2:] < -1e8).all()
    lo, hi = (Decision(tier, ins, torch.full((8,), k), torch.zeros(8, dtype=torch.long)) for k in (0, 1))
    blocks_lp = {k: policy.log_prob_and_entropy(lang, tokens, budget, d, heads=("num_blocks",))[0] for k, d in ((0, lo), (1, hi))}
    for k in (0, 1):
        assert torch.allclose(blocks_lp[k], blocks[:, k].log_softmax(-1)[:, 0])


def test_slo_accuracy_counts_late_answers_only_past_the_allowed_violation_rate():
    from lvlm_ctrl.grpo.module import slo_accuracy

    got = slo_accuracy([0.9, 0.9, 0.8], [0.04, 0.06, 0.0], [0.86, 0.84, 0.8], max_violation=0.05)
    assert got == [0.9, 0.84, 0.8]


def test_group_advantages_including_zero_std_groups():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    adv, zero = group_advantages(rewards, "group")
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert torch.equal(adv[1], torch.zeros(4)) and zero.item() == 0.5
    adv_none, _ = group_advantages(rewards, "none")
    assert torch.allclose(adv_none[0], torch.tensor([0.5, -0.5, 0.5, -0.5]))
    adv_batch, _ = group_advantages(rewards, "batch")
    assert torch.allclose(adv_batch[0], torch.tensor([0.5, -0.5, 0.5, -0.5]) / rewards.std(unbiased=False))
    assert not torch.isnan(group_advantages(torch.ones(3, 1), "group")[0]).any()
    with pytest.raises(ValueError):
        group_advantages(rewards, "median")


def test_grpo_loss_hand_checked():
    logp_old = torch.log(torch.tensor([0.5, 0.5, 0.2]))
    logp = torch.log(torch.tensor([0.8, 0.25, 0.2]))  # ratios 1.6, 0.5, 1.0
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, stats = grpo_loss(logp, logp_old, adv, clip_eps=0.2)
    # row 0: min(1.6*1, 1.2*1) = 1.2; row 1: min(0.5*-1, 0.8*-1) = -0.8; row 2: 2.0
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.0) / 3)
    assert stats["clip_ratio"].item() == pytest.approx(2 / 3)
    loss_kl, stats_kl = grpo_loss(logp, logp_old, adv, 0.2, logp_ref=logp_old, kl_coef=0.1,
                                  entropy=torch.tensor([1.0, 1.0, 1.0]), entropy_coef=0.5)
    delta = logp_old - logp
    kl = (torch.exp(delta) - delta - 1).mean()
    assert loss_kl.item() == pytest.approx(loss.item() + 0.1 * kl.item() - 0.5)
    assert stats_kl["kl"].item() == pytest.approx(kl.item())


def test_reward_terms():
    cfg = RewardConfig(accuracy=1.0, violation_sq=2.0, violation_rel=1.0, latency_sigmoid=0.5, complexity=0.1,
                       efficiency=0.2)
    comps = reward_components(cfg, torch.tensor([1.0, 1.0]), torch.tensor([50.0, 150.0]), torch.tensor([100.0, 100.0]),
                              torch.tensor([0.5, 1.0]))
    assert comps["violation_sq"].tolist() == pytest.approx([0.0, -2 * 0.25])
    assert comps["violation_rel"].tolist() == pytest.approx([0.0, -0.5])
    assert comps["efficiency"].tolist() == pytest.approx([0.2 * 0.5, 0.0])
    assert comps["complexity"].tolist() == pytest.approx([-0.05, -0.1])
    assert comps["latency_sigmoid"][0].item() > -0.01 and comps["latency_sigmoid"][1].item() < -0.49
    assert total_reward(comps)[0].item() > total_reward(comps)[1].item()
    far = reward_components(cfg, torch.ones(2), torch.tensor([150.0, 1000.0]), torch.tensor([100.0, 100.0]),
                            torch.ones(2))
    assert far["violation_rel"].tolist() == pytest.approx([-0.5, -0.5])  # capped at max_over=0.5
    uncapped = RewardConfig(max_over=None)
    assert reward_components(uncapped, torch.ones(1), torch.tensor([1000.0]), torch.tensor([100.0]),
                             torch.ones(1))["violation_rel"].item() == pytest.approx(-9.0)


def test_slo_term_counts_how_often_a_configuration_is_late_on_the_training_samples():
    import pandas as pd

    from lvlm_ctrl.grpo.env import ProfileEnv

    space = KnobSpace()
    fast, slow = space.cheapest(), space.full()
    rows = [{"sample_id": f"s{i:02d}", **k.as_dict(), "accuracy": 1.0, "T_total_ms": lat}
            for i in range(20) for k, lat in ((fast, 10.0 + i), (slow, 50.0 + i))]
    env = ProfileEnv(pd.DataFrame(rows), space)
    ids = lambda k: Decision(*(torch.tensor([i]) for i in (
        space.tiers.index(k.tier), space.insertions.index(k.insertion), space.top_ks.index(k.top_k),
        k.num_blocks - space.num_blocks_options(k.insertion)[0])))
    row = torch.tensor([0])
    assert env.miss_rate(ids(fast), torch.tensor([19.5]), row).item() == pytest.approx(0.5)  # 20..29 are late
    assert env.miss_rate(ids(fast), torch.tensor([29.0]), row).item() == 0.0
    assert env.miss_rate(ids(slow), torch.tensor([29.0]), row).item() == 1.0
    env.use_for_slo(torch.arange(10))  # only samples s0..s9 (10..19 ms) count now
    assert env.miss_rate(ids(fast), torch.tensor([19.5]), row).item() == 0.0
    # per input group (controller.group_by): s0..s9 small, s10..s19 large; a row counts its group's samples
    env.use_for_slo(torch.arange(20))
    env.set_groups(["small"] * 10 + ["large"] * 10, min_samples=5)
    small, large = torch.tensor([3]), torch.tensor([15])
    assert env.miss_rate(ids(fast), torch.tensor([19.5]), small).item() == 0.0
    assert env.miss_rate(ids(fast), torch.tensor([19.5]), large).item() == 1.0
    assert env.miss_rate(ids(fast), torch.tensor([24.5]), large).item() == pytest.approx(0.5)
    t, p, k, n = (int(x) for x in (space.tiers.index(fast.tier), space.insertions.index(fast.insertion),
                                   space.top_ks.index(fast.top_k), fast.num_blocks - space.num_blocks_options(fast.insertion)[0]))
    p95 = env.group_p95[:, t, p, k, n]
    assert p95[env.group_names.index("small")] < 20.0 < p95[env.group_names.index("large")] < 30.0
    env.set_groups(["small"] * 10 + ["large"] * 10, min_samples=11)  # groups too small: pooled
    assert env.miss_rate(ids(fast), torch.tensor([19.5]), small).item() == pytest.approx(0.5)
    cfg = RewardConfig(slo=0.5, slo_max_violation=0.05)
    comps = reward_components(cfg, torch.ones(3), torch.full((3,), 10.0), torch.full((3,), 100.0), torch.ones(3),
                              miss_rate=torch.tensor([0.0, 0.05, 0.06]))
    assert comps["slo"].tolist() == pytest.approx([0.0, 0.0, -0.5])
    assert reward_components(RewardConfig(), torch.ones(1), torch.ones(1), torch.ones(1),
                             torch.ones(1))["slo"].item() == 0.0  # off by default: no miss rate needed


def test_budget_distributions(tmp_path):
    g = torch.Generator().manual_seed(0)
    u = Uniform().bind((10.0, 50.0)).sample(1000, g)
    assert u.min() >= 10 and u.max() <= 50
    assert torch.equal(Fixed(30).sample(3), torch.full((3,), 30.0))
    n = Normal().bind((10.0, 50.0)).sample(20000, g)  # defaults: mid-range, a quarter of it as std
    assert n.mean().item() == pytest.approx(30.0, abs=0.3) and n.std().item() == pytest.approx(10.0, abs=0.3)
    trace = tmp_path / "budgets.txt"
    trace.write_text("10\n20\n30\n")
    t = Trace(str(trace))
    assert t.sample(2).tolist() == [10, 20] and t.sample(2).tolist() == [30, 10]
    trace.write_text("10\nfast\n")
    with pytest.raises(UserError, match="non-number"):
        Trace(str(trace))
    with pytest.raises(UserError):
        Uniform(50, 10).bind((1, 2)).sample(1)


def test_serving_language_feature_matches_training(backbone):
    """Serving tokenises one question through the Rust backend and sums a view of the embedding;
    training batches questions through the tokenizer with padding: both must give the same feature."""
    from lvlm_ctrl.controllers.grpo import embedding_view, language_sum
    from lvlm_ctrl.grpo.env import language_features

    questions = ["what shape is in the image?", "is there a red shape?", "what color is the circle?"]
    batch = language_features(backbone, questions)
    table = embedding_view(backbone)
    assert table is not None  # the embedded default is float32 on the CPU: the numpy path is the one served
    for q, row in zip(questions, batch):
        for total, n in (language_sum(backbone, q, table), language_sum(backbone, q)):
            assert n == len(backbone.tokenizer(q, add_special_tokens=False)["input_ids"])
            assert torch.allclose(torch.from_numpy(total) / n, row, atol=1e-6)


def bound_controller(backbone, policy: TwoStagePolicy, p95=None, **options):
    """A GRPOController serving `policy` as bind() would set it up from a checkpoint."""
    from lvlm_ctrl.controllers.grpo import GRPOController, embedding_view

    ctl = GRPOController(**options)
    d = backbone.model.get_input_embeddings().weight.shape[1]
    ctl.policy, ctl.kernel, ctl.embeddings = policy, ArgmaxKernel(policy, d, p95), embedding_view(backbone)
    return ctl


def synthetic_p95(space) -> torch.Tensor:
    """(tiers, P, K, N) p95 latencies growing with every knob, NaN where num_blocks is invalid."""
    t, p, k, n = torch.meshgrid(*(torch.arange(x, dtype=torch.float32) for x in (
        len(space.tiers), len(space.insertions), len(space.top_ks), space.max_block_options)), indexing="ij")
    lat = 10.0 * (1 + t) * (1 + 0.1 * k) * (1 + 0.05 * (p + n))
    valid = space.num_blocks_mask(torch.tensor(space.insertions))[None, :, None, :].expand_as(lat)
    return lat.masked_fill(~valid, float("nan"))


@pytest.mark.parametrize("guarded,image_size,counts", [(False, False, False), (True, False, False),
                                                        (False, True, False), (True, True, False), (False, True, True)])
def test_serving_decides_as_the_policy_does(backbone, easy_samples, guarded, image_size, counts):
    """GRPOController.serve (numpy kernel inside the serving forward pass) takes the policy's greedy
    decision for the same question, budget and latency token, at budgets that lead to different tiers;
    guarded, both choose only configurations whose p95 fits (the fastest when none does), and the
    guard changes some decisions. With controller.image_size, stage 1 reads the image's size too
    (images resized here so that it changes decisions); guarded as well, the guard's p95 is the one
    of the image's size class (controller.group_by=size). With controller.token_counts, stage 2 reads
    the request's vision and text token counts beside the latency token."""
    from lvlm_ctrl.data import size_class
    from lvlm_ctrl.grpo.env import language_features
    from lvlm_ctrl.grpo.policy import fitting, image_size_features, token_count_features

    space = backbone.space
    torch.manual_seed(7)
    d = backbone.model.get_input_embeddings().weight.shape[1]
    policy = TwoStagePolicy(space, d_model=d, hidden=32, image_size=image_size, token_counts=counts).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(3)
        policy.stage1[0].weight[:, d:d + policy.n_input] *= 30  # the two size features weigh like the question's d
        policy.stage2[0].weight[:, d:d + policy.n_counts] *= 100  # so do the token counts in stage 2
    p95 = synthetic_p95(space) if guarded else None
    grouped = guarded and image_size
    if grouped:
        p95 = {"small": p95, "medium": 1.5 * p95, "large": 2.5 * p95}
    ctl = bound_controller(backbone, policy, p95)
    ctl.group_by = "size" if grouped else None
    tiers, changed = set(), 0
    sizes = set()
    for i, s in enumerate(easy_samples[:3]):
        image = s.load_image().resize([(64, 64), (512, 128), (640, 480)][i]) if image_size else s.load_image()
        mine = p95[size_class(*image.size)] if grouped else p95
        lang = language_features(backbone, [s.question])
        if image_size:
            lang = torch.cat([lang, torch.from_numpy(image_size_features([image.size]))], dim=-1)
        for budget in (5.0, 20.0, 80.0, 300.0, 2000.0):
            gen, overhead = ctl.serve(backbone, s.question, image, budget)
            token = gen.latency_token.reshape(1, -1).float()
            if counts:
                token = torch.cat([token, torch.from_numpy(token_count_features(gen.vision_tokens, gen.text_tokens))], -1)
                zeroed = torch.cat([token[:, :d], torch.zeros(1, 2)], -1).reshape(1, 1, 1, -1).expand(
                    1, len(space.tiers), len(space.insertions), -1)
            tokens = token.reshape(1, 1, 1, -1).expand(1, len(space.tiers), len(space.insertions), -1)
            b = torch.tensor([budget])
            fits = fitting(mine, b) if guarded else None
            want = policy.act(lang, tokens.float(), b, greedy=True, fits=fits)
            assert gen.knobs == want.knobs(space)[0] and overhead > 0
            tiers.add(gen.knobs.tier)
            if counts:  # the same latency token without its token counts
                sizes.add(gen.knobs != policy.act(lang, zeroed, b, greedy=True).knobs(space)[0])
            elif image_size:  # the same question at another image size
                other = torch.cat([lang[:, :d], torch.from_numpy(image_size_features([(64, 64)]))], dim=-1)
                sizes.add(gen.knobs != policy.act(other, tokens.float(), b, greedy=True).knobs(space)[0])
            if guarded:
                chosen = mine[want.tier, want.insertion, want.top_k, want.num_blocks].item()
                assert chosen <= budget or chosen == mine.nan_to_num(float("inf")).min().item()
                changed += want.knobs(space) != policy.act(lang, tokens.float(), b, greedy=True).knobs(space)
    assert len(tiers) > 1  # the budget reaches the decision
    assert not guarded or changed > 0
    assert not image_size or True in sizes  # the image's size reaches the decision
    assert len(ctl.questions) == len({s.question for s in easy_samples[:3]})  # later budgets hit the cache


def test_budget_token_latency_token_is_the_same_in_training_and_serving(backbone, easy_samples):
    """controller.budget_token: training reads the budget token's hidden state from cached prompt
    states, serving from the live prefill; both must agree, the answer must be the one without the
    token, the token must depend on the budget, and its gradient must reach the policy."""
    from lvlm_ctrl.grpo.env import budget_token_latency_tokens, prompt_states
    from lvlm_ctrl.knobs import Knobs

    space, samples = backbone.space, easy_samples[:5]
    torch.manual_seed(3)
    d = backbone.model.get_input_embeddings().weight.shape[1]
    policy = TwoStagePolicy(space, d_model=d, hidden=32, budget_token=True)
    states = [tuple(t.clone() for t in tier) for tier in prompt_states(backbone, samples, batch_size=3)]
    budget = torch.tensor([12.0, 20.0, 30.0, 40.0, 50.0])
    tokens = budget_token_latency_tokens(backbone, policy.budget_query(budget), states, torch.arange(5))
    assert tokens.shape == (5, len(space.tiers), len(space.insertions), d)
    tokens.square().sum().backward()
    assert policy.budget_token.weight.grad.abs().sum() > 0
    other = budget_token_latency_tokens(backbone, policy.budget_query(budget + 10), states, torch.arange(5))
    assert not torch.allclose(tokens, other)
    seen = {}

    def decide(token, _prompt):
        seen["token"] = token
        return 6, 14

    sample, tier, p = samples[4], space.tiers.index("medium"), 3
    with torch.no_grad():
        query = policy.budget_query(budget[4:])
    image = sample.load_image()
    served = backbone.generate([image], [sample.question], Knobs("medium", p, 8, 16), decide=decide, query=query)
    plain = backbone.generate([image], [sample.question], Knobs("medium", p, 6, 14))
    assert torch.allclose(seen["token"][0], tokens[4, tier, space.insertions.index(p)].detach(), atol=1e-5)
    assert served.token_ids == plain.token_ids and served.knobs == Knobs("medium", p, 6, 14)


def test_budget_token_serving_keeps_one_query_per_budget(backbone, easy_samples):
    """GRPOController.serve with a budget-token policy: the token's embedding is computed once per
    budget and reused, and a repeated request is answered and decided the same way."""
    torch.manual_seed(11)
    d = backbone.model.get_input_embeddings().weight.shape[1]
    ctl = bound_controller(backbone, TwoStagePolicy(backbone.space, d_model=d, hidden=32, budget_token=True).eval())
    s = easy_samples[0]
    first, _ = ctl.serve(backbone, s.question, s.load_image(), 40.0)
    again, _ = ctl.serve(backbone, s.question, s.load_image(), 40.0)
    ctl.serve(backbone, s.question, s.load_image(), 90.0)
    assert sorted(ctl.queries) == [40.0, 90.0] and list(ctl.questions) == [s.question]
    assert (again.knobs, again.answers) == (first.knobs, first.answers)
