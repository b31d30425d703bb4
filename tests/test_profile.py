"""The profile CLI end to end: every configuration per sample, resume, shards, merge; batched answers."""

import pytest

from lvlm_ctrl.knobs import Knobs
from lvlm_ctrl.profiling import read_profile, stored_rows
from tests.conftest import error_line, run_cli


def profile(path, *overrides):
    proc = run_cli("lvlm_ctrl.profile", "data.split=val", "data.limit=2", f"profile.path={path}",
                   "profile.warmup=1", f"hydra.run.dir={path.parent / 'run'}", *overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_profile_resumes_shards_and_merges_without_duplicates(tmp_path):
    path = tmp_path / "profile"
    profile(path, "profile.shard=0", "profile.num_shards=2")
    profile(path, "profile.shard=1", "profile.num_shards=2")
    df = read_profile(path)
    assert stored_rows(path) == len(df) == 2 * 225 and df["sample_id"].nunique() == 2
    assert {"T_vision_ms", "T_prefill_ms", "T_decode_ms"} <= set(df) and (df["T_total_ms"] > 0).all()

    # a kill loses what was in flight: parts gone, a half-written temporary left behind
    parts = sorted((path / "shard0").glob("*.parquet"))
    for p in parts[:3]:
        p.unlink()
    (path / "shard0" / ".part-x.parquet.tmp").write_bytes(b"half a parquet file")
    lost = 225 - len(read_profile(path / "shard0"))
    assert lost > 0
    proc = profile(path, "profile.shard=0", "profile.num_shards=2")
    assert f"{225 - lost} of 225 records already" in proc.stdout
    assert stored_rows(path) == len(read_profile(path)) == 450  # nothing written twice

    proc = run_cli("lvlm_ctrl.profile", "merge=true", f"profile.path={path}", f"hydra.run.dir={tmp_path / 'm'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = read_profile(path / "profile.parquet")
    assert len(merged) == 450 and stored_rows(path) == 450  # the parts are gone, nothing twice


def test_empty_profile_path_is_a_clear_error(tmp_path):
    proc = run_cli("lvlm_ctrl.profile_report", f"profile.path={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and error_line(proc).startswith("error: no profile records")


@pytest.mark.parametrize("knobs", [Knobs("high", 5, 8, 16), Knobs("low", 1, 4, 12), Knobs("medium", 3, 6, 15)])
def test_batched_answers_equal_batch_one(backbone, easy_samples, knobs):
    samples = easy_samples[:12]
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    batched = backbone.generate(images, questions, knobs).answers
    assert batched == [backbone.generate([i], [q], knobs).answers[0] for i, q in zip(images, questions)]


def test_grouped_experts_kernel_gives_the_same_answers(backbone, easy_samples):
    """latency=predicted profiles answer in batches with grouped_mm: it must not change an answer."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["model.experts_implementation=grouped_mm"])
    grouped = instantiate(cfg.model)
    assert grouped.model.config.get_text_config()._experts_implementation == "grouped_mm"
    samples = easy_samples[:32]
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    for knobs in (Knobs("high", 5, 8, 16), Knobs("medium", 2, 5, 13)):
        assert grouped.generate(images, questions, knobs).answers == backbone.generate(images, questions, knobs).answers


@pytest.mark.slow
def test_shards_through_a_hydra_launcher_merge_to_the_rows_of_one_job(tmp_path):
    """Scale-out the way a cluster runs it: one job per shard through Hydra's launcher (joblib here,
    submitit on SLURM: hydra/launcher=submitit_slurm), then merge; the same rows as one job."""
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    proc = run_cli("lvlm_ctrl.profile", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "profile.shard=0,1", "profile.num_shards=2", "data.split=val", "data.limit=4",
                   f"profile.path={sharded}", "profile.warmup=0", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("lvlm_ctrl.profile", "merge=true", f"profile.path={sharded}", f"hydra.run.dir={tmp_path / 'm'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    profile(single, "data.limit=4", "profile.warmup=0")
    keys = ["sample_id", "tier", "insertion", "top_k", "num_blocks"]
    a = read_profile(sharded / "profile.parquet").sort_values(keys).reset_index(drop=True)
    b = read_profile(single).sort_values(keys).reset_index(drop=True)
    assert len(a) == len(b) == 4 * 225
    assert a[keys + ["prediction", "output_tokens"]].equals(b[keys + ["prediction", "output_tokens"]])
