"""Lookup table, oracle and latency model on synthetic profile records (real files, real parquet)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from lvlm_ctrl.controllers.lookup import LookupController, LookupTable
from lvlm_ctrl.controllers.oracle import OracleController
from lvlm_ctrl.data import VQASample
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.knobs import Knobs, KnobSpace
from lvlm_ctrl.latency_model import LatencyModel, held_out_mask, mape
from lvlm_ctrl.profiling import write_part

TIER_COST = {"low": 20.0, "medium": 35.0, "high": 60.0}
TIER_ACC = {"low": 0.55, "medium": 0.75, "high": 0.92}


def synthetic_profile(n_samples=20, seed=0, dataset="easy_vqa"):
    rng = np.random.default_rng(seed)
    rows = []
    for knobs in KnobSpace().configurations():
        for s in range(n_samples):
            text = int(rng.integers(6, 12))
            out = int(rng.integers(1, 3))
            vis = {"low": 4, "medium": 16, "high": 64}[knobs.tier]
            lat = (TIER_COST[knobs.tier] * knobs.num_blocks / 16 * (0.6 + 0.05 * knobs.top_k)
                   + 0.4 * text + 8 * out)
            p_ok = TIER_ACC[knobs.tier] - 0.02 * (8 - knobs.top_k) - 0.03 * (16 - knobs.num_blocks)
            rows.append({"dataset": dataset, "split": "val", "sample_id": f"s{s}", **knobs.as_dict(),
                         "vision_tokens": vis, "text_tokens": text, "output_tokens": out, "prediction": "x",
                         "accuracy": float(rng.random() < p_ok), "T_vision_ms": 2.0 + vis * 0.05,
                         "T_prefill_ms": lat * 0.7, "T_decode_ms": lat * 0.3,
                         "T_total_ms": 0.0, "latency_source": "measured", "backbone": "tiny_moe", "device": "cpu",
                         "retimed": 0})
    df = pd.DataFrame(rows)
    df["T_total_ms"] = df["T_vision_ms"] + df["T_prefill_ms"] + df["T_decode_ms"]
    return df


def test_predict_picks_most_accurate_that_fits_and_falls_back_to_closest():
    df = synthetic_profile()
    table = LookupTable.build(df, aggregation="mean", tolerance=0.0)
    stats = table.get_statistics()
    assert stats["num_configurations"] == 225
    lo, hi = stats["latency_range"]
    for budget in np.linspace(lo, hi, 7):
        c = table.predict(budget)
        fits = [e for e in table.tables["all"] if e["latency"] <= budget]
        assert c["latency"] <= budget and c["accuracy"] == max(e["accuracy"] for e in fits)
        assert {"tier", "top_k", "num_active_blocks", "accuracy", "latency", "num_samples", "accuracy_std",
                "latency_std"} <= set(c)
    tiny = table.predict(lo / 10)
    assert not tiny["within_budget"] and tiny["latency"] == lo
    cands = table.predict(hi, return_all_candidates=True)
    assert len(cands) == 225 and cands[0]["accuracy"] == stats["accuracy_range"][1]
    assert table.predict_stage1(hi) == {"tier": cands[0]["tier"], "insertion": cands[0]["insertion"]}
    assert set(table.predict_stage2(hi)) == {"top_k", "num_active_blocks"}


def test_tolerance_and_aggregations():
    df = synthetic_profile()
    mean = LookupTable.build(df)
    loose = LookupTable.build(df, tolerance=0.2)
    budget = float(np.median([e["latency"] for e in mean.tables["all"]]))
    assert loose.predict(budget)["accuracy"] >= mean.predict(budget)["accuracy"]
    q90 = LookupTable.build(df, latency_quantile=0.9)
    assert all(a["latency"] >= b["latency"] - 1e-9 for a, b in zip(
        sorted(q90.tables["all"], key=lambda e: (e["tier"], e["insertion"], e["top_k"], e["num_active_blocks"])),
        sorted(mean.tables["all"], key=lambda e: (e["tier"], e["insertion"], e["top_k"], e["num_active_blocks"]))))
    best = LookupTable.build(df, aggregation="max_accuracy")
    assert all(e["accuracy"] in (0.0, 1.0) for e in best.tables["all"])
    with pytest.raises(UserError, match="unknown aggregation"):
        LookupTable.build(df, aggregation="mode")


def test_per_dataset_tables_save_load_and_update(tmp_path):
    df = pd.concat([synthetic_profile(dataset="easy_vqa"), synthetic_profile(seed=1, dataset="text_vqa")])
    table = LookupTable.build(df)
    assert set(table.tables) == {"all", "easy_vqa", "text_vqa"}
    path = table.save(tmp_path / "lookup_table.json")
    loaded = LookupTable.load(path, KnobSpace())
    assert loaded.predict(80.0, dataset="text_vqa") == table.predict(80.0, dataset="text_vqa")
    assert loaded.coverage == 1.0
    with pytest.raises(UserError, match="no lookup table for dataset 'vqav2'"):
        loaded.predict(80.0, dataset="vqav2")
    only_easy = LookupTable.build(synthetic_profile(n_samples=10))
    grown = only_easy.update(synthetic_profile(n_samples=20).query("sample_id >= 's10'"))
    assert grown.get_statistics()["num_samples"] > only_easy.get_statistics()["num_samples"]
    assert all(e["num_samples"] == 20 for e in grown.tables["all"])
    regrown = grown.update(synthetic_profile(n_samples=20, seed=5))  # re-profiled samples replace old records
    assert all(e["num_samples"] == 20 for e in regrown.tables["all"])


def test_bisection_query_equals_a_linear_scan():
    """predict bisects a latency-sorted index with a prefix argmax: it must pick what scanning every
    entry for the most accurate fitting one (ties to the faster) picks, at any budget."""
    table = LookupTable.build(synthetic_profile(n_samples=4), latency_quantile=0.95)
    entries = table.tables["all"]
    rng = np.random.default_rng(1)
    lo, hi = table.feasible_range()
    for budget in rng.uniform(lo * 0.5, hi * 1.2, 300):
        fits = [e for e in entries if e["latency"] <= budget]
        want = (max(fits, key=lambda e: (e["accuracy"], -e["latency"])) if fits
                else min(entries, key=lambda e: e["latency"]))
        got = table.predict(float(budget))
        assert (got["accuracy"], got["latency"]) == (want["accuracy"], want["latency"])
        assert got["within_budget"] == bool(fits)


@pytest.mark.parametrize("content, message", [
    ("{not json", "malformed lookup table"),
    (json.dumps({"tables": {"all": []}, "options": {}}), "no configurations"),
    (json.dumps({"tables": {"all": [{"tier": "high"}]}, "options": {}}), "lacks"),
])
def test_malformed_table(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        LookupTable.load(path)


def test_mismatched_table_is_rejected(tmp_path):
    table = LookupTable.build(synthetic_profile(n_samples=3))
    path = table.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    data["tables"]["all"][0]["top_k"] = 11
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="does not match this backbone: top_k 11"):
        LookupTable.load(path, KnobSpace())


@pytest.mark.parametrize("budget", [0, -3, math.nan, "soon", None])
def test_bad_budgets(budget):
    table = LookupTable.build(synthetic_profile(n_samples=3))
    with pytest.raises(UserError, match="budget"):
        table.predict(budget)


def test_empty_profile_is_an_error():
    with pytest.raises(UserError, match="empty profile"):
        LookupTable.build(synthetic_profile().iloc[:0])


def test_oracle_picks_per_sample_best_within_budget(tmp_path):
    df = synthetic_profile(n_samples=5)
    write_part(tmp_path / "prof", "part-0.parquet", df.to_dict("records"))
    oracle = OracleController(str(tmp_path / "prof"))
    oracle.per_sample = {}
    oracle.bind(type("B", (), {"space": KnobSpace()})())
    sample = VQASample("s2", "", "q", ("a",))
    for budget in (30.0, 50.0, 90.0):
        k = oracle.decide(sample, budget)
        mine = df[df.sample_id == "s2"]
        fits = mine[mine.T_total_ms <= budget]
        chosen = mine[(mine.tier == k.tier) & (mine.insertion == k.insertion) & (mine.top_k == k.top_k)
                      & (mine.num_blocks == k.num_blocks)].iloc[0]
        assert chosen.accuracy == fits.accuracy.max()
        assert chosen.T_total_ms == fits[fits.accuracy == fits.accuracy.max()].T_total_ms.min()
    with pytest.raises(UserError, match="not in the oracle's profile"):
        oracle.decide(VQASample("zzz", "", "q", ("a",)), 50.0)


def test_latency_model_fits_linear_latency(tmp_path):
    df = synthetic_profile(n_samples=30)
    held = held_out_mask(df["sample_id"], 0.2)
    model = LatencyModel.fit(df[~held])
    err = mape(model.predict_frame(df[held]), df[held]["T_total_ms"].to_numpy())
    assert err < 1e-6  # the synthetic latency is exactly linear in the features
    loaded = LatencyModel.load(model.save(tmp_path / "lm.json"))
    r = df.iloc[5].to_dict()
    assert loaded.predict_record(r)["T_total_ms"] == pytest.approx(r["T_total_ms"])
    (tmp_path / "bad.json").write_text('{"configs": 3}')
    with pytest.raises(UserError, match="malformed latency model"):
        LatencyModel.load(tmp_path / "bad.json")


def test_lookup_controller_decides_knobs():
    ctrl = LookupController(build={"aggregation": "mean"})
    ctrl.fit(synthetic_profile(n_samples=4))
    ctrl.bind(type("B", (), {"space": KnobSpace()})())
    knobs = ctrl.decide(None, 70.0)
    assert isinstance(knobs, Knobs) and KnobSpace().validate(knobs)
    assert len(ctrl.default_budgets(10)) == 10


def test_query_cli_and_its_bad_input(tmp_path):
    from tests.conftest import error_line, run_cli

    path = LookupTable.build(synthetic_profile(n_samples=3)).save(tmp_path / "t.json")
    proc = run_cli("lvlm_ctrl.controllers.lookup", str(path), "30", "80")
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["budget_ms"] for a in answers] == [30, 80] and answers[0]["latency"] <= answers[1]["latency"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args, message in [([str(bad), "30"], "malformed lookup table"), ([str(path), "0"], "budget"),
                          ([str(path), "nan"], "budget"), ([str(path), "soon"], "budget"),
                          ([str(tmp_path / "none.json"), "30"], "lookup table not found")]:
        proc = run_cli("lvlm_ctrl.controllers.lookup", *args)
        assert proc.returncode == 2 and error_line(proc).startswith("error: ") and message in error_line(proc)
        assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1


def test_mismatched_table_and_empty_profile_fail_the_cli(tmp_path):
    from tests.conftest import error_line, run_cli

    table = LookupTable.build(synthetic_profile(n_samples=3))
    path = table.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    data["tables"]["all"][0]["tier"] = "ultra"
    path.write_text(json.dumps(data))
    proc = run_cli("lvlm_ctrl.evaluate", "controller=lookup", f"controller.table={path}", "data.limit=2",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 2 and "does not match this backbone" in error_line(proc)
    empty = tmp_path / "empty"
    write_part(empty, "part.parquet", [])
    proc = run_cli("lvlm_ctrl.train", "controller=lookup", f"profile.path={empty}", f"hydra.run.dir={tmp_path / 'tr'}")
    assert proc.returncode == 2 and "is empty" in error_line(proc)
    assert not (tmp_path / "tr" / "lookup_table.json").exists()


def test_grouped_tables_decide_per_input_group(tmp_path):
    """group_by=family_size (the structured oracle's grouping): digit questions need the high tier and
    colour questions do not; large images cost more. Each group's table picks that group's best
    configuration that fits, a group the profile never saw gets the pooled table's, and the groups
    survive save / load."""
    from PIL import Image

    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.new("RGB", (128, 128)).save(small)
    Image.new("RGB", (640, 480)).save(large)
    samples = [VQASample(f"val-{i:05d}-{fam}", str(large if i % 2 else small), "q?", ("a",))
               for i, fam in enumerate(["digit", "digit", "colour", "colour"] * 5)]
    rows = []
    for s in samples:
        fam, big = s.sample_id.rsplit("-", 1)[1], s.image_path == str(large)
        for knobs in [Knobs("low", 1, 4, 12), Knobs("high", 1, 4, 12)]:
            hi = knobs.tier == "high"
            acc = 1.0 if (hi or fam == "colour") else 0.0
            lat = (30.0 if hi else 10.0) * (2.0 if big else 1.0)
            rows.append({"dataset": "synth_vqa", "sample_id": s.sample_id, **knobs.as_dict(), "accuracy": acc,
                         "T_total_ms": lat})
    ctl = LookupController(build={"latency_quantile": 0.95, "group_by": "family_size"})
    table = ctl.fit(pd.DataFrame(rows), samples)
    assert {n for n in table.tables if n.startswith("group:")} == {
        "group:digit/small", "group:digit/large", "group:colour/small", "group:colour/large"}
    by_id = {s.sample_id: s for s in samples}
    decide = lambda sid, budget: ctl.decide(by_id[sid], budget).tier  # noqa: E731
    assert decide("val-00000-digit", 35.0) == "high"     # small image: the high tier fits at 30 ms
    assert decide("val-00001-digit", 35.0) == "low"      # large: 60 ms does not fit, low is what fits
    assert decide("val-00002-colour", 35.0) == "low"     # colour: low is as accurate and cheaper first
    assert decide("val-00001-digit", 70.0) == "high"
    pooled = LookupController(build={"latency_quantile": 0.95})
    pooled.fit(pd.DataFrame(rows))
    assert pooled.decide(by_id["val-00000-digit"], 35.0).tier == "low"  # the pool's p95 of high is 60 ms
    path = table.save(tmp_path / "table.json")
    loaded = LookupController(table=str(path)).bind(type("B", (), {"space": KnobSpace()})())
    assert loaded.decide(by_id["val-00000-digit"], 35.0).tier == "high"
    stranger = VQASample("val-00099-count", str(small), "q?", ("a",))  # a family it never saw
    assert loaded.decide(stranger, 35.0).tier == pooled.decide(stranger, 35.0).tier
    with pytest.raises(UserError, match="no input group"):
        LookupController(build={"group_by": "size"}).fit(pd.DataFrame(rows), samples[:3])
