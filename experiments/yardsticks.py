"""The evaluation yardsticks of the embedded default, end to end (issue 3's acceptance run).

    python experiments/yardsticks.py [--val 300] [--answers 1000] [--test 1000] [--kill-after 900]
    python experiments/yardsticks.py --model tiny_qwen3_vl_moe --data synth_vqa ...   # the testbed (issue 17)

1. profile the val split at every configuration (measured latency), SIGKILLed after --kill-after
   seconds and started again, then counts the unique rows (must be val x 225);
2. profile_report: per-configuration aggregates and the Pareto frontier;
3. latency_model: fit on the val profile, held-out MAPE;
4. train controller=lookup: the lookup table from the val profile;
5. profile the test split with latency=predicted (answers batched, times from the latency model):
   the oracle's per-sample view of the test split;
6. answer --answers val questions at every configuration (latency=predicted, batched) and give
   them the measured latencies of step 1 (profile_bootstrap); a second lookup table from it;
7. train the GRPO controller (python -m lvlm_ctrl.train controller=grpo, the defaults) on that
   profile;
8. evaluate static-full, lookup, lookup_boot, grpo and oracle on the test split at the lookup's 10
   budgets, latency measured at batch size 1 (--fresh-evals: again, e.g. on another machine or day);
   where sample ids name question families (synth_vqa), also the structured oracle: a lookup table
   per question family x image size class (controller.build.group_by=family_size), chosen on the
   val profile and applied to test, the realisable ceiling for controllers that see those features.
Each step writes into outputs/experiments/yardsticks[-<model>-<data>]/; a rerun skips finished
steps (the profile resumes). The figures and commands land in that directory's name + .json. Run
it alone: two shared cores skew every latency.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lvlm_ctrl.io import atomic_write_json, machine
from lvlm_ctrl.profiling import read_profile, stored_rows

OUT = ROOT / "outputs" / "experiments" / "yardsticks"  # + -<model>-<data> off the defaults
TESTBED: list[str] = []  # model=..., data=... given to every command
steps: dict[str, dict] = {}


def run(name: str, args: list[str], done: Path | None = None, kill_after: float | None = None) -> None:
    """python -m <args>, timed; skipped when `done` exists; SIGKILLed once after kill_after seconds."""
    if args[0] != "lvlm_ctrl.profile_bootstrap":  # the one command that is not a Hydra app
        args = [args[0], *TESTBED, *args[1:]]
    cmd = [sys.executable, "-m", *args]
    if done is not None and done.exists():
        print(f"[{name}] done already: {done}")
        return
    print(f"[{name}] {' '.join(['python -m', *args])}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        steps[f"{name}_killed_after_s"] = {"seconds": round(time.time() - t0, 1)}
        print(f"[{name}] SIGKILLed after {time.time() - t0:.0f} s; starting it again", flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] failed with exit code {proc.returncode}")
    steps[name] = {"command": " ".join(["python -m", *args]), "wall_s": round(time.time() - t0, 1)}


def results(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--answers", type=int, default=1000, help="val questions answered for GRPO's training profile")
    ap.add_argument("--kill-after", type=float, default=900.0, help="seconds into the val profile; 0 = no kill")
    ap.add_argument("--fresh-evals", action="store_true", help="rerun the evaluations (not the profiles)")
    ap.add_argument("--model", default="tiny_moe")
    ap.add_argument("--data", default="easy_vqa")
    a = ap.parse_args()
    global OUT
    TESTBED[:] = ["model=" + a.model, "data=" + a.data]
    if (a.model, a.data) != ("tiny_moe", "easy_vqa"):
        OUT = OUT.with_name(f"yardsticks-{a.model}-{a.data}")
    structured = a.data == "synth_vqa"
    val_profile, test_profile = OUT / f"profile-val-{a.val}", OUT / f"profile-test-{a.test}"
    lat_model, report_dir, lookup_dir = OUT / "latency_model.json", OUT / "profile_report", OUT / "lookup"
    test_data = ["data.split=test", f"data.limit={a.test}"]

    run("profile_val", ["lvlm_ctrl.profile", "data.split=val", f"data.limit={a.val}",
                        f"profile.path={val_profile}", f"hydra.run.dir={OUT / 'runs/profile_val'}"],
        kill_after=a.kill_after or None)
    df = read_profile(val_profile)
    rows = {"records": stored_rows(val_profile), "unique_keys": len(df),
            "expected": a.val * 225, "samples": int(df["sample_id"].nunique())}
    print(f"val profile: {rows}")
    run("profile_report", ["lvlm_ctrl.profile_report", f"profile.path={val_profile}",
                           f"hydra.run.dir={report_dir}"], done=report_dir / "pareto.json")
    run("latency_model", ["lvlm_ctrl.latency_model", f"profile.path={val_profile}", f"output={lat_model}",
                          f"hydra.run.dir={OUT / 'runs/latency_model'}"], done=lat_model)
    run("lookup", ["lvlm_ctrl.train", "controller=lookup", f"profile.path={val_profile}",
                   f"hydra.run.dir={lookup_dir}"], done=lookup_dir / "lookup_table.json")
    # answers in batches of 64 with the grouped expert kernel (same answers, far faster on CPU)
    run("profile_test", ["lvlm_ctrl.profile", *test_data, "latency=predicted", f"latency.model={lat_model}",
                         "profile.batch_size=64", "model.experts_implementation=grouped_mm",
                         f"profile.path={test_profile}", f"hydra.run.dir={OUT / 'runs/profile_test'}"],
        done=test_profile / "done")
    (test_profile / "done").touch()

    answers, boot = OUT / f"profile-val-{a.answers}-predicted", OUT / f"profile-val-{a.answers}-boot.parquet"
    run("answers_val", ["lvlm_ctrl.profile", "data.split=val", f"data.limit={a.answers}", "latency=predicted",
                        f"latency.model={lat_model}", "profile.batch_size=64", "model.experts_implementation=grouped_mm",
                        f"profile.path={answers}", f"hydra.run.dir={OUT / 'runs/answers_val'}"], done=answers / "done")
    (answers / "done").touch()
    run("bootstrap", ["lvlm_ctrl.profile_bootstrap", str(answers), str(val_profile), str(boot)], done=boot)
    lookup_boot = OUT / "lookup-boot"
    run("lookup_boot", ["lvlm_ctrl.train", "controller=lookup", f"profile.path={boot}",
                        f"hydra.run.dir={lookup_boot}"], done=lookup_boot / "lookup_table.json")
    grpo_dir = OUT / "grpo"
    run("train_grpo", ["lvlm_ctrl.train", "controller=grpo", "budget=uniform", f"profile.path={boot}",
                       f"data.limit={a.answers}", f"hydra.run.dir={grpo_dir}"], done=grpo_dir / "checkpoints" / "best.ckpt")

    if structured:
        lookup_structured = OUT / "lookup-structured"
        run("lookup_structured", ["lvlm_ctrl.train", "controller=lookup", f"profile.path={val_profile}",
                                  "controller.build.group_by=family_size", f"hydra.run.dir={lookup_structured}"],
            done=lookup_structured / "lookup_table.json")

    from lvlm_ctrl.controllers.lookup import LookupTable

    lo, hi = LookupTable.load(lookup_dir / "lookup_table.json").feasible_range()
    budgets = [round(lo + (hi - lo) * i / 9, 2) for i in range(10)]
    grid = f"eval.budgets_ms=[{','.join(map(str, budgets))}]"
    evals = {
        "static_full": ["controller=static"],
        "lookup": ["controller=lookup", f"controller.table={lookup_dir / 'lookup_table.json'}"],
        "lookup_boot": ["controller=lookup", f"controller.table={lookup_boot / 'lookup_table.json'}"],
        "grpo": ["controller=grpo", f"ckpt={grpo_dir / 'checkpoints' / 'best.ckpt'}"],
        "oracle": ["controller=oracle", f"profile.path={test_profile}"],
    }
    if structured:
        evals["structured_oracle"] = ["controller=lookup",
                                      f"controller.table={lookup_structured / 'lookup_table.json'}"]
    if a.fresh_evals:  # one session's latencies: compare controllers measured on the same day
        for name in evals:
            (OUT / "eval" / name / "eval_summary.json").unlink(missing_ok=True)
    summaries = {}
    for name, overrides in evals.items():
        d = OUT / "eval" / name
        compare = [str(OUT / "eval" / n / "eval_summary.json") for n in evals
                   if n != name and (OUT / "eval" / n / "eval_summary.json").exists()]
        run(f"evaluate_{name}", ["lvlm_ctrl.evaluate", *overrides, *test_data, grid, f"hydra.run.dir={d}",
                                 f"eval.compare=[{','.join(compare)}]"], done=d / "eval_summary.json")
        summaries[name] = results(d / "eval_summary.json")

    table = [{"budget_ms": b, **{f"{n}_{k}": s["results"][i][k] for n, s in summaries.items()
                                 for k in ("accuracy", "violation_rate", "median_latency_ms")}}
             for i, b in enumerate(budgets)]
    report = {
        "val_profile": rows, "pareto_span": results(report_dir / "pareto.json")["span"],
        "latency_model_mape": results(lat_model)["meta"]["held_out_mape"],
        "budgets_ms": budgets, "auc": {n: s["auc"] for n, s in summaries.items()}, "table": table,
        "max_lookup_violation": max(r["lookup_violation_rate"] for r in table),
        "max_grpo_violation": max(r["grpo_violation_rate"] for r in table),
        "grpo_minus_lookup_min_points": round(100 * min(r["grpo_accuracy"] - r["lookup_accuracy"] for r in table), 2),
        # the share of the lookup-to-oracle AUC gap that GRPO closes (1 = as good as the oracle)
        "grpo_gap_share": (summaries["grpo"]["auc"] - summaries["lookup"]["auc"])
        / (summaries["oracle"]["auc"] - summaries["lookup"]["auc"]),
        **({"grpo_structured_gap_share": (summaries["grpo"]["auc"] - summaries["lookup"]["auc"])
            / (summaries["structured_oracle"]["auc"] - summaries["lookup"]["auc"]),
            "structure": {
                "full_p95_over_p5": summaries["static_full"]["results"][0]["p95_latency_ms"]
                / summaries["static_full"]["results"][0]["p5_latency_ms"],
                "full_accuracy_by_family": summaries["static_full"]["results"][0]["accuracy_by_family"],
                "structured_minus_lookup_auc_points": round(
                    100 * (summaries["structured_oracle"]["auc"] - summaries["lookup"]["auc"]), 2)}}
           if structured else {}),
        "controller_overhead_ms": {n: sorted(r["controller_overhead_ms"] for r in s["results"])[len(s["results"]) // 2]
                                   for n, s in summaries.items()},
        "steps": steps, "machine": machine(),
    }
    atomic_write_json(OUT.with_suffix(".json"), report)
    print(f"{'budget':>8} | " + " | ".join(f"{n:>20}" for n in summaries))
    for r in table:
        print(f"{r['budget_ms']:8.1f} | " + " | ".join(
            f"{r[n + '_accuracy']:.3f} viol {r[n + '_violation_rate']:.3f}" for n in summaries))
    print(json.dumps({k: report[k] for k in ("val_profile", "pareto_span", "latency_model_mape", "auc",
                                             "max_lookup_violation", "max_grpo_violation",
                                             "grpo_minus_lookup_min_points", "grpo_gap_share",
                                             "grpo_structured_gap_share", "structure",
                                             "controller_overhead_ms") if k in report}, indent=1))


if __name__ == "__main__":
    main()
