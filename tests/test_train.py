"""train through the real composed config (hydra.compose), a real Lightning Trainer and real files."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from lvlm_ctrl.controllers.grpo import load_policy
from lvlm_ctrl.data import build_dataset
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.knobs import Knobs
from lvlm_ctrl.profiling import read_profile, write_part
from lvlm_ctrl.train import train
from tests.conftest import ROOT, error_line, run_cli
from tests.test_lookup import synthetic_profile

N = 24


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    """A synthetic profile over the first N easy-VQA val questions (ids the real dataset has)."""
    ids = [s.sample_id for s in build_dataset("easy_vqa", "val", limit=N).samples]
    df = synthetic_profile(n_samples=N)
    df["sample_id"] = df["sample_id"].map({f"s{i}": ids[i] for i in range(N)})
    path = tmp_path_factory.mktemp("profile")
    write_part(path, "part-0.parquet", df.to_dict("records"))
    return path


def compose_train(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig().set_config(cfg)
    return cfg


def test_grpo_fast_dev_run(tmp_path, profile_dir):
    cfg = compose_train(tmp_path, "controller=grpo", f"profile.path={profile_dir}", f"data.limit={N}",
                        "logger=csv", "+trainer.fast_dev_run=true", "controller.group_size=4")
    assert 0.0 < train(cfg) <= 1.0  # the validation's val/auc_slo: a run that never validated raises


def test_grpo_trains_checkpoints_and_resumes(tmp_path, profile_dir):
    args = ["controller=grpo", f"profile.path={profile_dir}", f"data.limit={N}", "logger=csv",
            "trainer.log_every_n_steps=1", "trainer.max_steps=6", "trainer.val_check_interval=3",
            "profile.batch_size=8"]
    cfg = compose_train(tmp_path, *args)
    train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists() and (tmp_path / "checkpoints" / "best.ckpt").exists()
    first = torch.load(last, weights_only=True)["global_step"]
    assert first >= 3  # written at a validation
    policy, hp = load_policy(last)
    assert hp["group_size"] == cfg.controller.group_size and policy.space.num_layers == 16
    s = policy.space  # serving's speed tracking reads the profile's latency per configuration
    latency = torch.tensor(hp["config_latency_ms"])
    assert latency.shape == (len(s.tiers), len(s.insertions), len(s.top_ks), s.max_block_options)
    assert latency.nan_to_num(1.0).gt(0).all() and latency.isnan().any()  # invalid (p, n) pairs are NaN
    train(compose_train(tmp_path, *args[:-3], "trainer.max_steps=9", "trainer.val_check_interval=3",
                             "profile.batch_size=8", "ckpt_path=last"))
    assert torch.load(last, weights_only=True)["global_step"] > first  # resumed from last, went on
    header = ",".join(f.read_text().splitlines()[0] for f in (tmp_path / "csv").rglob("metrics.csv"))
    for key in ("train/reward_mean", "train/frac_zero_std_groups", "train/clip_ratio", "entropy/tier",
                "reward/violation_sq_mean", "val/auc", "val/auc_in_budget", "val/auc_slo", "knobs/tier_mean_index"):
        assert key in header


@pytest.mark.parametrize("budget_token", [False, True])
def test_budgeted_vqa_from_a_train_run(tmp_path, profile_dir, budget_token):
    """The Python entry point: load a train run (its saved config and checkpoint), answer a batch."""
    from PIL import Image

    from lvlm_ctrl.infer import BudgetedVQA

    cfg = compose_train(tmp_path, "controller=grpo", f"profile.path={profile_dir}", f"data.limit={N}",
                        "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2", "profile.batch_size=8",
                        f"controller.budget_token={budget_token}")
    train(cfg)
    assert (load_policy(tmp_path / "checkpoints" / "last.ckpt")[0].budget_token is not None) == budget_token
    (tmp_path / ".hydra").mkdir()
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # what Hydra writes into every run
    vqa = BudgetedVQA.from_run(tmp_path)
    sample = build_dataset("easy_vqa", "test", limit=1).samples[0]
    image = sample.load_image()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "blue.png")
    out = vqa.answer([(image, sample.question, 30.0), (str(tmp_path / "nothing.png"), "what?", 30.0),
                      (str(tmp_path / "blue.png"), "what color is the shape?", 1e4)])
    assert len(out) == 3 and "image not found" in out[1]["error"]  # one bad request loses no other answer
    out = [out[0], out[2]]
    for r in out:
        vqa.backbone.space.validate(Knobs(**r["knobs"]))
        assert r["answer"] and r["latency_ms"] > 0 and r["stages_ms"]["controller"] > 0
        assert r["within_budget"] == (r["latency_ms"] <= r["budget_ms"])
    with pytest.raises(UserError, match="not a train run"):
        BudgetedVQA.from_run(tmp_path / "checkpoints")


def test_lookup_train_writes_table(tmp_path, profile_dir):
    train(compose_train(tmp_path, "controller=lookup", f"profile.path={profile_dir}"))
    table = json.loads((tmp_path / "lookup_table.json").read_text())
    assert len(table["tables"]["all"]) == 225
    profile = read_profile(profile_dir)  # each entry's latency: its configuration's 95th percentile
    for e in table["tables"]["all"][:20]:
        rows = profile[(profile["tier"] == e["tier"]) & (profile["insertion"] == e["insertion"])
                       & (profile["top_k"] == e["top_k"]) & (profile["num_blocks"] == e["num_active_blocks"])]
        assert e["latency"] == pytest.approx(float(np.quantile(rows["T_total_ms"], 0.95)))


@pytest.mark.slow
def test_training_prepares_a_missing_profile_once(tmp_path):
    """No profile at profile.path: training prepares it (measured, latency model, batched answers,
    bootstrap) in a directory named for the backbone, dataset, split and size; a second run reuses it."""
    cfg = compose_train(tmp_path / "run1", "controller=lookup", "data.limit=5", "profile.measured=3",
                        f"profile.path={tmp_path / 'profiles' / 'p'}")
    train(cfg)
    work = tmp_path / "profiles" / "p"
    assert {p.name for p in work.iterdir()} >= {"measured-3", "latency_model.json", "answers-5", "profile.parquet"}
    profile = read_profile(work / "profile.parquet")
    assert len(profile) == 5 * 225 and profile["sample_id"].nunique() == 5
    measured = read_profile(work / "measured-3")
    assert len(measured) == 3 * 225 and (measured["latency_source"] == "measured").all()
    stamp = (work / "profile.parquet").stat().st_mtime_ns
    train(compose_train(tmp_path / "run2", "controller=lookup", "data.limit=5", "profile.measured=3",
                        f"profile.path={work}"))
    assert (work / "profile.parquet").stat().st_mtime_ns == stamp  # reused, not prepared again
    assert json.loads((tmp_path / "run2" / "lookup_table.json").read_text())["tables"]["all"]
    with open_dict(cfg):
        cfg.model.name = "another_backbone"
    with pytest.raises(UserError, match="another_backbone"):
        train(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["image=/no/such.png", "question=what?", "budget_ms=50"], "image not found"),
    (["image=IMG", "question=", "budget_ms=50"], "question is empty"),
    (["image=IMG", "question=what?", "budget_ms=nan"], "positive, finite"),
    (["image=IMG", "question=what?", "budget_ms=-1"], "positive, finite"),
    (["image=IMG", "question=what?", "budget_ms=soon"], "not a number"),
    (["image=IMG", "question=what?", "budget_ms=50", "ckpt=/no/ckpt"], "no checkpoint file at /no/ckpt"),
    (["image=BAD", "question=what?", "budget_ms=50"], "unreadable image"),
])
def test_infer_bad_input(tmp_path, overrides, message):
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    overrides = [o.replace("IMG", str(tmp_path / "ok.png")).replace("BAD", str(tmp_path / "bad.png"))
                 for o in overrides]
    proc = run_cli("lvlm_ctrl.infer", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert message in error_line(proc) and "Traceback" not in proc.stderr


def test_grpo_writes_a_wandb_offline_run(tmp_path, profile_dir):
    """The default logger: a real W&B run, offline, in the run directory, with the validation curve."""
    cfg = compose_train(tmp_path, "controller=grpo", f"profile.path={profile_dir}", f"data.limit={N}",
                        "trainer.max_steps=2", "trainer.val_check_interval=2", "profile.batch_size=8")
    assert cfg.logger.offline is True
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/val/accuracy_vs_budget*.table.json"))
    assert tables and json.loads(tables[0].read_text())["columns"] == ["budget_ms", "accuracy", "violation_rate"]


def test_every_run_ends_validated_with_a_checkpoint_and_a_rerun_never_overwrites_it(tmp_path, profile_dir):
    """trainer.max_steps below the validation interval still validates and checkpoints; training again
    into the same run directory is refused (resuming it is the way), and leaves its files as they were."""
    args = ["controller=grpo", f"profile.path={profile_dir}", f"data.limit={N}", "logger=csv",
            "trainer.max_steps=4", "profile.batch_size=8"]
    score = train(compose_train(tmp_path, *args))
    best = tmp_path / "checkpoints" / "best.ckpt"
    assert best.exists() and score > 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(compose_train(tmp_path, *args))
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before
