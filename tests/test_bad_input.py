"""Bad input at every command line: one line naming the problem and the fix, exit 2, no traceback,
and nothing already written lost. One case per row; each runs the real CLI in a subprocess."""

import json

import pytest

from lvlm_ctrl.profiling import write_part
from tests.conftest import error_line, run_cli
from tests.test_lookup import synthetic_profile

KEEP = '{"keep": true}'


@pytest.fixture
def files(tmp_path):
    """A file where a directory is needed, a truncated checkpoint, profiles good, renamed, foreign and
    broken, a lookup table without options, and a result already written in the output directory."""
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    ids = {f"s{i}": f"val-{i}" for i in range(4)}
    good = synthetic_profile(n_samples=4).assign(sample_id=lambda d: d["sample_id"].map(ids))
    write_part(tmp_path / "renamed" / "shard0", "part-0.parquet",
               good.assign(tier=good["tier"].map({"low": "small", "medium": "mid", "high": "big"})).to_dict("records"))
    write_part(tmp_path / "foreign" / "shard0", "part-0.parquet", good.assign(backbone="qwen").to_dict("records"))
    (tmp_path / "broken" / "shard0").mkdir(parents=True)
    (tmp_path / "broken" / "shard0" / "part-0.parquet").write_bytes(b"PAR1 truncated")
    write_part(tmp_path / "good" / "shard0", "part-0.parquet", good.to_dict("records"))
    (tmp_path / "no_options.json").write_text(json.dumps({"tables": {"all": [{"tier": "low"}]}}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "eval_summary.json").write_text(KEEP)
    return tmp_path


CASES = [
    # train
    ("lvlm_ctrl.train", ["budget=fixed", "budget.budget_ms=nan"], "budget.budget_ms=nan"),
    ("lvlm_ctrl.train", ["budget=fixed", "budget.budget_ms=inf"], "budget.budget_ms=inf"),
    ("lvlm_ctrl.train", ["budget=fixed", "budget.budget_ms=soon"], "budget.budget_ms='soon' is not a number"),
    ("lvlm_ctrl.train", ["ckpt_path={tmp}/truncated.ckpt"], "cannot resume from"),
    ("lvlm_ctrl.train", ["data.limit=abc"], "data.limit='abc'"),
    ("lvlm_ctrl.train", ["profile.measured=many"], "profile.measured='many'"),
    ("lvlm_ctrl.train", ["profile.path={tmp}/renamed", "data.limit=4"], "outside this backbone's knob space"),
    ("lvlm_ctrl.train", ["controller=lookup", "profile.path={tmp}/renamed"], "does not match this backbone"),
    ("lvlm_ctrl.train", ["profile.path={tmp}/foreign", "data.limit=4"], "is of backbone ['qwen']"),
    ("lvlm_ctrl.train", ["controller=lookup", "profile.path={tmp}/broken"], "malformed profile part"),
    ("lvlm_ctrl.train", ["paths.output_dir={tmp}/a_file/run"], "cannot write into"),
    # an option the chosen environment never reads
    ("lvlm_ctrl.train", ["controller.online.measure_fraction=0.1"],
     "controller.online.measure_fraction applies with controller.env=online only"),
    ("lvlm_ctrl.train", ["controller.env=online", "profile.answer_batch_size=8"],
     "profile.answer_batch_size applies with controller.env=profile only"),
    # evaluate
    ("lvlm_ctrl.evaluate", ["controller=lookup", "controller.table={tmp}/no_options.json"], "malformed lookup table"),
    ("lvlm_ctrl.evaluate", ["eval.output_dir={tmp}/a_file/run"], "cannot write into"),
    ("lvlm_ctrl.evaluate", ["data.limit=abc"], "data.limit='abc'"),
    ("lvlm_ctrl.evaluate", ["controller=oracle", "profile.path={tmp}/broken"], "malformed profile part"),
    # profile, report, latency model, importance, infer
    ("lvlm_ctrl.profile", ["data.limit=0"], "data.limit=0"),
    ("lvlm_ctrl.profile", ["profile.path={tmp}/foreign", "data.limit=1"], "holds a profile of backbone ['qwen']"),
    ("lvlm_ctrl.profile_report", ["profile.path={tmp}/broken"], "malformed profile part"),
    ("lvlm_ctrl.latency_model", ["profile.path={tmp}/good", "output={tmp}/a_file/lm.json"], "cannot write into"),
    ("lvlm_ctrl.importance", ["data.limit=abc"], "data.limit='abc'"),
    ("lvlm_ctrl.infer", ["image={tmp}/a_file", "question=what?", "budget_ms=inf"], "positive, finite"),
]


@pytest.mark.parametrize("module, overrides, message", CASES, ids=[f"{m.split('.')[-1]}:{' '.join(o)}"
                                                                   for m, o, _ in CASES])
def test_one_line_error(files, module, overrides, message):
    overrides = [o.replace("{tmp}", str(files)) for o in overrides]
    proc = run_cli(module, *overrides, f"hydra.run.dir={files / 'out'}")
    line = error_line(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert line.startswith("error: ") and message in line, line
    assert "Traceback" not in proc.stderr
    assert (files / "out" / "eval_summary.json").read_text() == KEEP  # nothing already written is touched


def test_bootstrap_onto_a_directory(files):
    proc = run_cli("lvlm_ctrl.profile_bootstrap", str(files / "good"), str(files / "good"), str(files / "out"))
    assert proc.returncode == 2 and "is a directory" in error_line(proc) and "Traceback" not in proc.stderr
    assert (files / "out" / "eval_summary.json").read_text() == KEEP
