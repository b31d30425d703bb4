"""The evaluate CLI end to end (real Hydra, real backbone, real files) and its bad-input errors."""

import json

import pytest
from hydra import compose, initialize_config_dir

from lvlm_ctrl.errors import UserError
from lvlm_ctrl.evaluate import auc, parse_budgets
from tests.conftest import ROOT, error_line, run_cli
from tests.test_data import make_vqav2

FIELDS = {"budget_ms", "accuracy", "violation_rate", "mean_latency_ms", "median_latency_ms", "p95_latency_ms",
          "mean_latency_over_budget", "controller_overhead_ms", "knobs"}


def test_config_composes_with_every_group():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["data=vqav2", "controller.tier=low"])
    assert cfg.data.name == "coco_2014_vqa" and cfg.controller.tier == "low"
    assert cfg.model._target_ == "lvlm_ctrl.backbone.load_backbone" and cfg.latency.source == "measured"


def test_static_evaluation_writes_summary(tmp_path):
    proc = run_cli("lvlm_ctrl.evaluate", "controller=static", "controller.tier=low", "controller.insertion=2",
                   "controller.top_k=5", "controller.num_blocks=14", "data.split=test", "data.limit=6",
                   "eval.budgets_ms=[50,400]", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert summary["controller"] == "static" and summary["dataset"] == "easy_vqa"
    assert summary["split"] == "test" and summary["num_samples"] == 6 and summary["latency_source"] == "measured"
    assert [r["budget_ms"] for r in summary["results"]] == [50, 400]
    for r in summary["results"]:
        assert FIELDS <= set(r)
        assert 0 <= r["accuracy"] <= 1 and r["median_latency_ms"] > 0 and 0 <= r["violation_rate"] <= 1
        assert r["knobs"] == {"tier": {"low": 6}, "insertion": {"2": 6}, "top_k": {"5": 6}, "num_blocks": {"14": 6}}
    assert summary["auc"] == pytest.approx(summary["results"][0]["accuracy"])  # a static controller's curve is flat


def test_full_configuration_is_default(tmp_path):
    proc = run_cli("lvlm_ctrl.evaluate", "data.limit=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "eval_summary.json").read_text())["results"][0]
    assert result["budget_ms"] is None and result["violation_rate"] is None
    assert result["knobs"]["tier"] == {"high": 3} and result["knobs"]["num_blocks"] == {"16": 3}


@pytest.mark.parametrize("overrides, message", [
    (["controller.tier=ultra"], "unknown tier 'ultra'"),
    (["controller.insertion=3", "controller.num_blocks=12"], "num_blocks 12 is invalid at insertion 3"),
    (["model.path=/nonexistent/ckpt"], "no model checkpoint at /nonexistent/ckpt"),
    (["eval.budgets_ms=[nan]"], "must be a positive"),
    (["eval.budgets_ms=[-5]"], "must be a positive"),
    (["eval.budgets_ms=[fast]"], "is not a number"),
    (["controller=grpo", "ckpt=x.ckpt", "controller.serving.question_cache=-1"], "question_cache=-1"),
    (["eval.budgets_ms=[]"], "eval.budgets_ms is empty"),
    (["eval.num_budgets=0"], "eval.num_budgets=0"),
    (["calibration.target=2"], "calibration.target"),
])
def test_bad_input_one_line_error(tmp_path, overrides, message):
    (tmp_path / "eval_summary.json").write_text('{"keep": true}')
    proc = run_cli("lvlm_ctrl.evaluate", "data.limit=2", *overrides, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert error_line(proc).startswith("error: ") and message in error_line(proc)
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "eval_summary.json").read_text()) == {"keep": True}  # nothing clobbered


def test_unreadable_image_is_named(tmp_path):
    root = make_vqav2(tmp_path / "vqa", corrupt=True)
    proc = run_cli("lvlm_ctrl.evaluate", "data=vqav2", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "unreadable image" in error_line(proc) and "COCO_val2014_000000000002.jpg" in error_line(proc)
    assert not (tmp_path / "run" / "eval_summary.json").exists()


def test_budget_parsing_and_auc():
    assert parse_budgets(None) == [None]
    assert parse_budgets([10, "20.5"]) == [10.0, 20.5]
    with pytest.raises(UserError):
        parse_budgets([0])
    results = [{"budget_ms": 10.0, "accuracy": 0.5}, {"budget_ms": 30.0, "accuracy": 1.0}]
    assert auc(results) == pytest.approx(0.75)
    assert auc(results[:1]) is None
    assert auc([{"budget_ms": 10.0, "accuracy": 0.5}, {"budget_ms": 10.0, "accuracy": 0.7}]) is None  # no range


def test_budget_order_rotates_per_sample(backbone, easy_samples):
    """A sample's first request is its slowest (a new image and question): every budget takes that
    turn equally often, instead of the lowest budget always."""
    from lvlm_ctrl.controllers.static import StaticController
    from lvlm_ctrl.evaluate import run_requests

    class Recording(StaticController):
        def decide(self, sample, budget_ms):
            order.append(budget_ms)
            return super().decide(sample, budget_ms)

    order = []
    budgets = [10.0, 20.0, 30.0]
    records, _ = run_requests(backbone, {"a": Recording().bind(backbone)}, easy_samples[:3], budgets)
    assert order == [10.0, 20.0, 30.0, 20.0, 30.0, 10.0, 30.0, 10.0, 20.0]
    assert all(len(records["a"][b]) == 3 for b in budgets)

    # the floor probe takes its turn in the rotation too, once per sample
    order.clear()
    records, probes = run_requests(backbone, {"a": Recording().bind(backbone)}, easy_samples[:2], budgets,
                                   probe=lambda s, image: order.append("probe") or 5.0)
    assert order == [10.0, 20.0, 30.0, "probe", 20.0, 30.0, "probe", 10.0]
    assert probes == [5.0, 5.0]


def test_controllers_take_turns_side_by_side(backbone, easy_samples):
    """Two controllers evaluated together take turns request by request (a drifting machine slows
    both alike), each sample at every budget, and each keeps its own records."""
    from lvlm_ctrl.controllers.static import StaticController
    from lvlm_ctrl.evaluate import run_requests

    class Recording(StaticController):
        def __init__(self, tag, **kw):
            super().__init__(**kw)
            self.tag = tag

        def decide(self, sample, budget_ms):
            order.append((self.tag, budget_ms))
            return super().decide(sample, budget_ms)

    order = []
    controllers = {"a": Recording("a").bind(backbone), "b": Recording("b", tier="low").bind(backbone)}
    records, _ = run_requests(backbone, controllers, easy_samples[:2], [10.0, 20.0])
    assert order == [("a", 10.0), ("a", 20.0), ("b", 10.0), ("b", 20.0), ("a", 20.0), ("b", 10.0), ("b", 20.0), ("a", 10.0)]
    assert {r["knobs"]["tier"] for b in (10.0, 20.0) for r in records["b"][b]} == {"low"}
    assert {r["knobs"]["tier"] for b in (10.0, 20.0) for r in records["a"][b]} == {"high"}


def test_floor_probe_marks_budgets_no_controller_could_keep(backbone, easy_samples):
    """The probe serves the cheapest profiled configuration; a budget below its p95 (plus the
    controller's overhead) during the evaluation is marked not keepable, the others keepable."""
    from lvlm_ctrl.evaluate import floor_probe, keepable
    from lvlm_ctrl.knobs import Knobs

    class Cheapest:
        def profiled_configurations(self):
            return [(Knobs("high", 4, 8, 16), 30.0), (Knobs("low", 1, 4, 12), 10.0)]

    probe = floor_probe(backbone, Cheapest())
    s = easy_samples[0]
    assert probe(s, s.load_image()) > 0
    results = [{"budget_ms": b} for b in (5.0, 8.6, 8.7, None)]
    floor = keepable(results, [8.0] * 19 + [11.0], overhead_ms=0.5)
    assert floor == {"p95_ms": pytest.approx(8.15 + 0.5), "requests": 20}
    assert [r["keepable"] for r in results] == [False, False, True, True]
