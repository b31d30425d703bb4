"""The online environment (controller.env=online): rollouts on the live backbone, scored as batch-1
generate scores them, run once per (sample, configuration), latency from the latency model on the
request's own tokens plus a measured residual, timed rollouts refitting it; and training through it."""

import json
import shutil

import numpy as np
import pytest
import torch

from lvlm_ctrl.data.profiles import _Subset
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.grpo.online import OnlineEnv
from lvlm_ctrl.grpo.policy import Decision
from lvlm_ctrl.knobs import Knobs
from lvlm_ctrl.latency_model import STAGES, LatencyModel, held_out_mask
from lvlm_ctrl.metrics import vqa_score
from lvlm_ctrl.profile import profile_split
from lvlm_ctrl.profiling import KNOB_COLUMNS, read_profile
from lvlm_ctrl.train import train
from tests.conftest import run_cli
from tests.test_train import compose_train

MEASURED = 1


class _Dataset:
    name, split = "easy_vqa", "val"

    def __init__(self, samples):
        self.samples = samples


@pytest.fixture(scope="module")
def measured(backbone, easy_samples, tmp_path_factory):
    """The first MEASURED samples timed at every configuration, and the latency model fitted on them."""
    path = tmp_path_factory.mktemp("measured")
    profile_split(backbone, _Subset(_Dataset(easy_samples), MEASURED), path, "measured", warmup=0)
    df = read_profile(path)
    return df, LatencyModel.fit(df, min_records=1000)  # per-tier fits: the measured records keep residuals


def decision(space, configs):
    return Decision(torch.tensor([space.tiers.index(k.tier) for k in configs]),
                    torch.tensor([space.insertions.index(k.insertion) for k in configs]),
                    torch.tensor([space.top_ks.index(k.top_k) for k in configs]),
                    torch.tensor([k.num_blocks - k.insertion - space.min_kept_after for k in configs]))


def test_new_pairs_run_once_scored_as_generate_scores_them(backbone, easy_samples, measured):
    df, model = measured
    samples = easy_samples[:8]
    env = OnlineEnv(backbone, samples, model, df, measure_fraction=0.0, seed=0)
    space, configs = backbone.space, backbone.space.configurations()
    picks = [configs[0], configs[-1], configs[77], configs[150], configs[77]]
    rows = torch.tensor([2, 2, 5, 7, 5])  # (5, configs[77]) twice: one rollout
    kernel = backbone.model.config.get_text_config()._experts_implementation
    acc, lat = env.outcome(rows, decision(space, picks))
    assert env.stats["rollouts_run"] == 4
    assert backbone.model.config.get_text_config()._experts_implementation == kernel  # timed requests: serving's
    for r, k, a in zip(rows.tolist(), picks, acc.tolist()):
        gen = backbone.generate([samples[r].load_image()], [samples[r].question], k)
        assert a == vqa_score(gen.answers[0], list(samples[r].answers))
    # an unmeasured sample's latency: its own tokens' prediction plus its donor's residual, per stage
    r, k = 5, picks[2]
    c = configs.index(k)
    d = int(env._residual_donors()[r, c])
    mine = model.predict(k.tier, k.insertion, k.top_k, k.num_blocks, *env.token_counts[r, space.tiers.index(k.tier)].tolist(),
                         float(env.output_tokens[r, c]))
    donor = df[(df["sample_id"] == env.sample_ids[d]) & (df["tier"] == k.tier) & (df["insertion"] == k.insertion)
               & (df["top_k"] == k.top_k) & (df["num_blocks"] == k.num_blocks)].iloc[0]
    theirs = model.predict_record(donor.to_dict())
    expected = sum(max(0.0, mine[s] + donor[s] - theirs[s]) for s in STAGES)
    assert lat[2].item() == pytest.approx(expected, rel=1e-4)
    assert d < MEASURED  # nothing timed since: the donors are the window's
    # drawn again: read, not run
    env.outcome(rows, decision(space, picks))
    assert env.stats["rollouts_run"] == 4 and env.metrics()["online/read_fraction"] == pytest.approx(6 / 10)
    # the measured samples are read from their profile, at their measured latency
    acc, lat = env.outcome(torch.tensor([0, 0]), decision(space, [configs[5], configs[200]]))
    assert env.stats["rollouts_run"] == 4
    for r, k, a, t in zip((0, 0), (configs[5], configs[200]), acc.tolist(), lat.tolist()):
        rec = df[(df["sample_id"] == samples[r].sample_id) & (df["tier"] == k.tier) & (df["insertion"] == k.insertion)
                 & (df["top_k"] == k.top_k) & (df["num_blocks"] == k.num_blocks)].iloc[0]
        assert a == rec["accuracy"] and t == pytest.approx(rec["T_total_ms"], rel=1e-5)


def test_timed_rollouts_refit_the_latency_model(backbone, easy_samples, measured):
    df, model = measured
    env = OnlineEnv(backbone, easy_samples[:8], model, df, measure_fraction=1.0, refit_every=3, seed=0)
    configs = backbone.space.configurations()
    picks = [configs[i] for i in (3, 60, 120, 180)]
    env.outcome(torch.tensor([2, 3, 4, 6]), decision(backbone.space, picks))
    assert env.stats["measured"] == 4 and len(env.history) == 1  # refitted after the third, on all four
    assert env.model is not model and len(env.measured) == len(df) + 4
    metrics = env.metrics()
    assert 0.0 <= metrics["online/latency_mape"] < 10 and metrics["online/speed"] > 0
    timed = env.measured.tail(4)  # in the first profile's units: the window's speed against the model divided out
    assert float(np.median(timed["T_total_ms"].to_numpy() / model.predict_frame(timed))) == pytest.approx(1.0, rel=1e-4)
    for (r, k), t in zip(zip((2, 3, 4, 6), picks), timed["T_total_ms"]):  # a timed rollout's latency: its own
        assert env.measured_ms[r, configs.index(k)].sum().item() == pytest.approx(t, rel=1e-5)
        assert env.latency[(r, *(i[configs.index(k)] for i in env.cell))].item() == pytest.approx(t, rel=1e-5)
    # the tails follow every timing: an untimed pair borrows its residual from its configuration's timed
    # requests, the window's and those timed since
    donors, timed = env._residual_donors(), ~torch.isnan(env.measured_ms[..., 0])
    assert timed[donors, torch.arange(len(configs))].all()
    c = configs.index(picks[0])
    assert set(donors[:, c].tolist()) == {0, 2}  # the window's sample 0 and the rollout timed on sample 2


def test_the_machine_slowing_within_a_window_is_divided_out_where_it_happened(backbone, easy_samples, measured):
    """Half a window's timings at the machine's speed, half at 1.6x: each is divided by its neighbours'
    speed, so both halves fold in at the first profile's speed; one speed for the window (its median)
    would put the first half at ~0.8x and the second at ~1.3x, a spread the machine never had at any
    moment, and the tails every controller decision reads would carry it."""
    df, model = measured
    env = OnlineEnv(backbone, easy_samples[:8], model, df, measure_fraction=0.0, refit_every=1000, speed_window=9, seed=0)
    rows = df.sample(60, random_state=0).reset_index(drop=True)
    ids = {sid: i for i, sid in enumerate(env.sample_ids)}
    configs = backbone.space.configurations()
    predicted = model.predict_frame(rows)
    for i, r in rows.iterrows():
        slow = 1.0 if i < 30 else 1.6
        rec = r.to_dict()
        stages = model.predict_record(rec)
        rec.update({s: stages[s] * slow for s in STAGES}, T_total_ms=predicted[i] * slow)
        env.new_measurements.append({**rec, "row": ids[rec["sample_id"]],
                                     "config": configs.index(Knobs(*(rec[n] for n in KNOB_COLUMNS)))})
    env._refit()
    folded = env.measured.tail(60)
    ratio = folded["T_total_ms"].to_numpy() / predicted
    assert env.history[-1]["speed"] == pytest.approx(1.3)  # the window's median, reported
    assert np.abs(ratio - 1.0).max() < 1e-6  # the step lands between two timings: 5 of 9 neighbours agree


def test_a_resumed_environment_keeps_its_rollouts_and_refits(backbone, easy_samples, measured, tmp_path):
    """state_dict -> a checkpoint (loaded with weights_only) -> a fresh environment: the pairs run
    before are read, not run again, with the same scores and latencies, and the refitted latency
    model is the one it had."""
    df, model = measured
    samples, configs = easy_samples[:4], backbone.space.configurations()
    env = OnlineEnv(backbone, samples, model, df, measure_fraction=1.0, refit_every=2, seed=0)
    picks, rows = [configs[3], configs[100], configs[200]], torch.tensor([1, 2, 3])
    acc, _ = env.outcome(rows, decision(backbone.space, picks))
    assert env.history and env.stats["rollouts_run"] == 3
    torch.save({"env": env.state_dict()}, tmp_path / "env.ckpt")
    state = torch.load(tmp_path / "env.ckpt", weights_only=True)["env"]
    again = OnlineEnv(backbone, samples, model, df, measure_fraction=1.0, refit_every=2, seed=0)
    again.load_state_dict(state)
    acc2, lat2 = again.outcome(rows, decision(backbone.space, picks))
    assert again.stats["rollouts_run"] == 3 and again.history == env.history
    assert torch.equal(acc2, acc) and torch.allclose(lat2, env.outcome(rows, decision(backbone.space, picks))[1])
    assert torch.allclose(again.latency, env.latency, equal_nan=True) and torch.allclose(again.p95, env.p95, equal_nan=True)
    with pytest.raises(UserError, match="ran other samples"):
        OnlineEnv(backbone, easy_samples[:3], model, df).load_state_dict(state)


def test_a_given_profile_is_read_not_run(backbone, easy_samples, measured):
    """Pairs in a given profile are read (its answers' scores), never run; its latency counts only where
    it was measured."""
    df, model = measured
    configs = backbone.space.configurations()
    known = df.iloc[:6].assign(sample_id=easy_samples[1].sample_id, accuracy=0.25, latency_source="predicted",
                               T_total_ms=1e6)
    env = OnlineEnv(backbone, easy_samples[:2], model, df, known=known)
    picks = [configs[configs.index(backbone.space.parse(*r))] for r in known[["tier", "insertion", "top_k", "num_blocks"]]
             .itertuples(index=False)]
    acc, lat = env.outcome(torch.ones(6, dtype=torch.long), decision(backbone.space, picks))
    assert env.stats["rollouts_run"] == 0 and acc.eq(0.25).all() and lat.lt(1e5).all()
    with pytest.raises(UserError, match="outside this backbone's knob space"):  # another space's: never indexed
        OnlineEnv(backbone, easy_samples[:2], model, df, known=known.assign(top_k=3))


def test_online_training_prepares_only_the_latency_model(tmp_path):
    prof = tmp_path / "prof"
    overrides = ["controller=grpo", "budget=uniform", "controller.env=online", "data.limit=16", "profile.measured=1",
                 f"profile.path={prof}", "profile.batch_size=4", "profile.val_fraction=0.5", "controller.group_size=4",
                 "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
                 "controller.online.measure_fraction=0.2", "controller.online.refit_every=2", "logger=csv"]
    cfg = compose_train(tmp_path / "run", *overrides)
    assert 0.0 < train(cfg) <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
    assert sorted(p.name for p in prof.iterdir() if not p.name.startswith(".")) == ["latency_model.json", "measured-1"]
    header = ",".join(f.read_text().splitlines()[0] for f in (tmp_path / "run" / "csv").rglob("metrics.csv"))
    for key in ("online/rollouts_run", "online/read_fraction", "online/latency_mape", "val/auc_slo"):
        assert key in header
    # resumed: the environment comes back from last.ckpt, its rollouts and refits with it
    before = json.loads((tmp_path / "run" / "online_env.json").read_text())
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["env"]
    assert len(saved["known"]) == before["pairs_known"] and saved["history"] == before["refits"]
    cfg = compose_train(tmp_path / "run", *[o for o in overrides if not o.startswith("trainer.max_steps")],
                        "trainer.max_steps=6", "ckpt_path=last")
    train(cfg)
    after = json.loads((tmp_path / "run" / "online_env.json").read_text())
    assert after["rollouts_run"] >= before["rollouts_run"] and after["refits"][:len(before["refits"])] == before["refits"]


def test_online_training_steps_draw_from_the_pool(tmp_path):
    prof, run = tmp_path / "prof", tmp_path / "run"
    cfg = compose_train(run, "controller=grpo", "budget=uniform", "controller.env=online", "data.limit=16",
                        "profile.measured=1", f"profile.path={prof}", "profile.batch_size=2", "profile.val_fraction=0.5",
                        "controller.group_size=4", "trainer.max_steps=4", "trainer.val_check_interval=4",
                        "controller.online.measure_fraction=0", "controller.online.pool=2", "logger=csv")
    train(cfg)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # latency tokens exist only for the pool and the held-out split: a step that read another would be NaN
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    state = ckpt["env"]
    ids = state["sample_ids"]
    held = held_out_mask(ids, 0.5)
    timed = set(read_profile(next(prof.glob("measured-*")))["sample_id"].astype(str))
    ran = {ids[r] for r in state["known"][:, 0].tolist()} - timed  # the timed question is known from the start
    trained = {i for i in ran if not held[ids.index(i)]}
    # 8 draws, from the pool's 2 of the split's 8 training questions (one of them may be the timed one)
    assert 0 < len(trained) <= 2 < sum(not h for h in held)


def test_online_training_reads_a_moved_latency_model_preparation(tmp_path):
    """The latency model names the measured profile it was fitted on by the path it was prepared
    under; a copy of the directory elsewhere (another machine, another working directory) still trains."""
    overrides = ("controller=grpo", "controller.env=online", "data.limit=6", "profile.measured=1",
                 "profile.batch_size=2", "profile.val_fraction=0.5", "controller.group_size=2", "trainer.max_steps=1",
                 "controller.online.measure_fraction=0", "logger=csv")
    train(compose_train(tmp_path / "run1", *overrides, f"profile.path={tmp_path / 'prof'}"))
    (tmp_path / "prof").rename(tmp_path / "moved")
    train(compose_train(tmp_path / "run2", *overrides, f"profile.path={tmp_path / 'moved'}"))
    assert (tmp_path / "run2" / "checkpoints" / "best.ckpt").exists()
    shutil.rmtree(tmp_path / "moved" / "measured-1")
    with pytest.raises(UserError, match="is gone; delete latency_model.json there"):
        train(compose_train(tmp_path / "run3", *overrides, f"profile.path={tmp_path / 'moved'}"))


def test_online_env_options_are_checked(tmp_path):
    for override, message in (("controller.env=offline", "choose profile or online"),
                              ("+controller.online.bogus=1", "unknown controller.online option"),
                              ("controller.online.measure_fraction=2", "give a fraction in"),
                              ("controller.online.rollout_batch_size=0", "give a positive whole number"),
                              ("controller.online.speed_window=0", "give a positive whole number"),
                              ("controller.online.pool=0", "or null: every training question")):
        cfg = compose_train(tmp_path, "controller=grpo", "controller.env=online", "data.limit=4",
                            f"profile.path={tmp_path / 'p'}", override)
        with pytest.raises(UserError, match=message):
            train(cfg)
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_online_training_on_tiny_qwen3_vl_moe(tmp_path, tiny_checkpoints):
    proc = run_cli("lvlm_ctrl.train", "controller=grpo", "budget=uniform", "controller.env=online", "model=qwen3_vl_moe",
                   f"model.path={tiny_checkpoints('qwen3_vl_moe')}", "data.limit=6", "profile.measured=1",
                   f"profile.path={tmp_path / 'prof'}", "profile.batch_size=2", "profile.val_fraction=0.5",
                   "controller.group_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2", "logger=csv",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
