"""Profiles that a disturbance cannot skew, and that two processes or two knob spaces cannot mix up."""

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from lvlm_ctrl.controllers.lookup import LookupTable
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.grpo.env import ProfileEnv
from lvlm_ctrl.knobs import KnobSpace
from lvlm_ctrl.profile import profile_split
from lvlm_ctrl.profiling import read_profile, robust_quantile, stored_rows
from tests.conftest import ROOT
from tests.test_lookup import synthetic_profile


class Subset:
    def __init__(self, samples):
        self.name, self.split, self.samples = "easy_vqa", "val", samples


@pytest.mark.slow
def test_a_stall_in_some_requests_is_timed_again(backbone, easy_samples, tmp_path, monkeypatch):
    """Every 40th request stalls inside its timed region, as if another process held the cores:
    those requests are timed again, no stored latency holds a stall, and the rows say so. The stall
    is sized from this machine's own slowest request (at least 250 ms) so that a slow CI machine,
    whose plain requests take longer, still sees it as one (3x a chunk's median is the guard's bar)."""
    samples = Subset(easy_samples[:4])
    images = [s.load_image() for s in samples.samples]
    full = backbone.space.full()
    slowest_s = max(backbone.generate([im], [s.question], full).total_ms
                    for im, s in zip(images, samples.samples) for _ in range(2)) / 1e3
    stall_s = max(0.25, 6 * slowest_s)
    calls = {"n": 0}
    encode = backbone.encode

    def stalling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 40 == 0:
            time.sleep(stall_s)
        return encode(*args, **kwargs)

    monkeypatch.setattr(backbone, "encode", stalling)
    profile_split(backbone, samples, tmp_path / "p", "measured", batch_size=4, warmup=1)
    df = read_profile(tmp_path / "p")
    assert len(df) == 4 * 225
    assert (df["T_total_ms"] < stall_s * 1e3 * 0.8).all(), (df["T_total_ms"].max(), stall_s)
    assert df["retimed"].sum() >= 1  # stalls did land in the profile's requests, and were re-run


def test_robust_statistics_ignore_rows_a_disturbance_slowed():
    """The lookup's latency per configuration, the feasible range and so the budget grid leave out
    rows over 3x their configuration's median (older profiles, or a stall the guard let through)."""
    clean = synthetic_profile(n_samples=40)
    stalled = clean.copy()
    rng = np.random.default_rng(0)
    hit = rng.choice(len(stalled), size=len(stalled) // 100, replace=False)  # 1% of the rows
    stalled.loc[hit, "T_total_ms"] = rng.uniform(200, 2400, size=len(hit))
    grids = []
    for df in (clean, stalled):
        table = LookupTable.build(df, latency_quantile=0.95)
        env = ProfileEnv(df, KnobSpace())
        grids.append((table.feasible_range(), env.feasible))
    (t_clean, e_clean), (t_stalled, e_stalled) = grids
    assert t_stalled == pytest.approx(t_clean, rel=0.1) and e_stalled == pytest.approx(e_clean, rel=0.1)
    assert t_stalled == pytest.approx(e_stalled)  # both controllers default to the same budgets
    plain = np.quantile(stalled.groupby(["tier", "insertion", "top_k", "num_blocks"])["T_total_ms"]
                        .quantile(0.95), 1.0)
    assert plain > 2 * t_clean[1]  # without it the grid would run past the slowest configuration
    assert robust_quantile([10, 11, 12, 500], 0.95) == pytest.approx(np.quantile([10, 11, 12], 0.95))


def test_another_knob_space_never_mixes_into_the_environment():
    """A record whose num_blocks another space allows (p=3, n=12: index -1 here) used to wrap around."""
    df = synthetic_profile(n_samples=3)
    bad = df.iloc[:1].assign(insertion=3, num_blocks=12)
    with pytest.raises(UserError, match="outside this backbone's knob space"):
        ProfileEnv(pd.concat([df, bad], ignore_index=True), KnobSpace())
    with pytest.raises(UserError, match="outside this backbone's knob space"):
        ProfileEnv(df.assign(tier=df["tier"].str.upper()), KnobSpace())


@pytest.mark.slow
def test_two_processes_on_one_profile_compute_each_unit_once(tmp_path):
    path = tmp_path / "p"
    cmd = [sys.executable, "-m", "lvlm_ctrl.profile", "data.split=val", "data.limit=1", f"profile.path={path}",
           "profile.warmup=0"]
    procs = [subprocess.Popen([*cmd, f"hydra.run.dir={tmp_path / f'run{i}'}"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert stored_rows(path) == len(read_profile(path)) == 225  # not 450: the second waited, then found it done
    assert any("225 of 225 records already" in out for out, _ in outs)


def test_profile_of_another_backbone_is_refused(backbone, tmp_path):
    from lvlm_ctrl.profiling import write_part

    write_part(tmp_path / "p" / "shard0", "part-0.parquet",
               synthetic_profile(n_samples=1).assign(backbone="other").to_dict("records"))
    with pytest.raises(UserError, match="backbone"):
        profile_split(backbone, Subset([]), tmp_path / "p", "measured")
