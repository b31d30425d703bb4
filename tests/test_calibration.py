"""Latency calibration: the line and the margin it keeps online, and the controllers deciding through it."""

import numpy as np
import pytest
import torch

from lvlm_ctrl.calibration import LatencyCalibration
from lvlm_ctrl.controllers.lookup import LookupController
from lvlm_ctrl.knobs import Knobs
from tests.test_lookup import synthetic_profile


def slower(x):
    """A machine that adds 4 ms to every request and runs 30% slower on top."""
    return 4.0 + 1.3 * x


def test_the_line_follows_a_machine_slower_than_its_profile():
    cal = LatencyCalibration()
    cal.reset((8.0, 40.0))
    assert cal.profiled_budget(30.0) == pytest.approx(30.0)  # before any request: as profiled
    for x in np.tile(np.linspace(8, 40, 9), 60):
        cal.observe(x, slower(x), budget_ms=1e3)
    a, b = cal.line
    assert a == pytest.approx(4.0, abs=0.3) and b == pytest.approx(1.3, abs=0.02)
    # a configuration that fits the returned budget on the profile's machine fits the real one here
    assert slower(cal.profiled_budget(30.0)) == pytest.approx(30.0, rel=0.02)
    off = LatencyCalibration(enabled=False)
    off.observe(10.0, 50.0, 20.0)
    assert off.profiled_budget(30.0) == 30.0 and off.line == (0.0, 1.0)


def test_one_stalled_request_moves_the_line_little():
    cal = LatencyCalibration()
    cal.reset((8.0, 40.0))
    for x in np.tile(np.linspace(8, 40, 9), 30):
        cal.observe(x, x, budget_ms=1e3)
    before = cal.profiled_budget(30.0)
    cal.observe(20.0, 2400.0, budget_ms=1e4)  # 2.4 s: something else held the machine (in time, for the margin)
    assert cal.profiled_budget(30.0) == pytest.approx(before, rel=0.03)


def test_the_margin_steers_the_late_fraction_to_its_target():
    rng = np.random.default_rng(0)
    cal = LatencyCalibration(step=0.05, target=0.05)
    cal.reset((8.0, 40.0))
    for _ in range(400):  # on time: the margin stays at 1 (it only adds caution)
        cal.observe(20.0, 20.0, budget_ms=25.0)
    assert cal.margin(25.0) == 1.0
    late = 0
    for _ in range(2000):  # a tail the profile never showed: 30% of requests run 40% longer
        budget = 25.0
        x = min(cal.profiled_budget(budget), 20.0)
        measured = x * (1.4 if rng.random() < 0.3 else 1.0)
        late += measured > budget
        cal.observe(x, measured, budget_ms=budget)
    assert cal.margin(25.0) > 1.0 and late / 2000 < 0.12
    assert cal.margin(40.0) == 1.0  # another budget's band kept its own
    margin = cal.margin(10.0)
    for _ in range(50):  # nothing was predicted to fit: lateness there is no news
        cal.observe(20.0, 40.0, budget_ms=10.0, predicted_to_fit=False)
    assert cal.margin(10.0) == margin


def test_a_margin_allowed_below_one_loosens_a_band_that_is_never_late():
    cal = LatencyCalibration(min_margin=0.8)
    cal.reset((8.0, 40.0))
    for _ in range(400):  # the controller is careful: nothing it picks comes near the budget
        cal.observe(20.0, 20.0, budget_ms=25.0)
    assert cal.margin(25.0) == pytest.approx(0.8)
    # the band's own feedback, not the line, loosens it: past the budget itself
    assert cal.profiled_budget(25.0) == pytest.approx(25.0 / 0.8, rel=0.02)
    assert cal.margin(40.0) == 1.0  # a band nothing was served in stays as it was
    for _ in range(200):  # then every request runs late: the margin climbs back over 1
        cal.observe(20.0, 30.0, budget_ms=25.0)
    assert cal.margin(25.0) > 1.0 and cal.profiled_budget(25.0) < 25.0


@pytest.mark.parametrize("bad", [{"halflife": -1}, {"target": 1.5}, {"step": "fast"},
                                 {"min_margin": 0.0}, {"min_margin": 1.2}])
def test_bad_calibration_options(bad):
    with pytest.raises(ValueError, match="calibration"):
        LatencyCalibration(**bad)


def test_the_lookup_decides_for_the_budget_the_profile_would_see():
    ctl = LookupController(build={"latency_quantile": 0.95})
    ctl.fit(synthetic_profile(n_samples=20))

    class Space:  # the table's own configurations are this backbone's
        from lvlm_ctrl.knobs import KnobSpace

        space = KnobSpace()

    ctl.bind(Space())
    budget = 60.0
    as_profiled = ctl.decide(None, budget)
    cal = LatencyCalibration()
    cal.reset(ctl.profiled_range())
    ctl.calibration = cal
    for knobs, x in ctl.profiled_configurations()[::7]:
        ctl.decide(None, 1e3)
        ctl.observe(knobs, slower(x), 1e3)
    calibrated = ctl.decide(None, budget)
    entry, plain = ctl.table.predict(cal.profiled_budget(budget)), ctl.table.predict(budget)
    assert (entry["tier"], entry["insertion"], entry["top_k"], entry["num_active_blocks"]) == tuple(
        calibrated.as_dict().values())
    assert (plain["tier"], plain["insertion"], plain["top_k"], plain["num_active_blocks"]) == tuple(
        as_profiled.as_dict().values())
    assert entry["latency"] < plain["latency"]  # cheaper on the slower machine
    assert slower(entry["latency"]) <= budget * 1.02 < slower(plain["latency"])  # and there it fits


def test_grpo_serving_decides_for_the_calibrated_budget(backbone, easy_samples):
    """With a calibration that has seen a machine 3x slower than the profile, GRPOController.serve
    takes the policy's greedy decision for the profiled budget, and feeds each request back."""
    from lvlm_ctrl.grpo.env import language_features
    from lvlm_ctrl.grpo.policy import TwoStagePolicy
    from tests.test_grpo import bound_controller

    space = backbone.space
    torch.manual_seed(7)
    d = backbone.model.get_input_embeddings().weight.shape[1]
    policy = TwoStagePolicy(space, d_model=d, hidden=32).eval()
    ctl = bound_controller(backbone, policy)
    shape = (len(space.tiers), len(space.insertions), len(space.top_ks), space.max_block_options)
    ctl.expected = np.full(shape, 10.0)
    cal = LatencyCalibration()
    cal.reset((5.0, 40.0))
    for x in np.tile(np.linspace(5, 40, 8), 40):
        cal.observe(x, 3 * x, budget_ms=1e3)
    ctl.calibration = cal
    s = easy_samples[0]
    lang = language_features(backbone, [s.question])
    seen = cal.seen
    assert cal.profiled_budget(30.0) == pytest.approx(10.0, rel=0.05)
    for budget in (30.0, 90.0):
        profiled = round(cal.profiled_budget(budget), 1)
        gen, _ = ctl.serve(backbone, s.question, s.load_image(), budget)
        ctl.observe(gen.knobs, gen.total_ms, budget)
        tokens = gen.latency_token.reshape(1, 1, 1, -1).expand(1, len(space.tiers), len(space.insertions), d)
        want = policy.act(lang, tokens.float(), torch.tensor([profiled]), greedy=True).knobs(space)[0]
        assert gen.knobs == want
    assert cal.seen == seen + 2
    assert ctl.profiled_latency(Knobs("high", 1, 8, 16)) == 10.0


def test_warm_up_measures_the_serving_floor_and_the_default_grid_starts_there():
    from lvlm_ctrl.evaluate import serving_grid

    rng = np.random.default_rng(0)
    configurations = [(f"c{i}", x) for i, x in enumerate(np.linspace(8, 40, 30))]
    timed = []

    def run(knobs):
        timed.append(knobs)
        return slower(dict(configurations)[knobs]) * (1 + 0.1 * rng.random())

    cal = LatencyCalibration(warmup=6, floor=40)
    cal.reset((8.0, 40.0))
    cal.warm_up(run, configurations)
    assert timed.count("c0") == 2 + 40  # the cheapest: twice as one of the six, then `floor` times
    assert len(timed) == 2 * 6 + 2 * 40 and timed[12::2] == ["c29"] * 40  # each floor timing after the costliest
    # the timings' p97.5 (between 1.0 and 1.1 x the cheapest's slowed latency) plus the drift allowance
    assert slower(8.0) * (1 + cal.drift) < cal.floor_ms <= slower(8.0) * 1.1 * (1 + cal.drift)
    profiled = [float(b) for b in np.linspace(8.0, 40.0, 10)]
    grid = serving_grid(profiled, cal.floor_ms)
    assert grid[0] == pytest.approx(cal.floor_ms) and len(grid) == 10
    assert grid == pytest.approx([b * cal.floor_ms / 8.0 for b in profiled])  # scaled by the cheapest's slowdown
    very_slow = serving_grid(profiled, 80.0)  # even the cheapest is slower than the profile's full model
    assert very_slow[0] == 80.0 and very_slow[-1] == 400.0
    assert serving_grid(profiled, 5.0) == profiled and serving_grid(profiled, None) == profiled  # a faster machine
    off = LatencyCalibration(enabled=False)
    off.warm_up(run, configurations)
    assert off.floor_ms is None
