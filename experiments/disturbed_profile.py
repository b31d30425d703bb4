"""Can a disturbance skew a profile? The same measured profile twice, back to back: once with the
machine to itself, once with a busy process started a few minutes into the timing and running for a
few minutes (the incident of issue 15: 179 rows at 200 ms-2.4 s made the feasible range 20-545 ms).
Then `make run`'s training and evaluation on the disturbed profile.

    python experiments/disturbed_profile.py --answers outputs/profiles/tiny_moe/easy_vqa-val-500/answers-500 \\
        [--measured 100] [--busy-after 180] [--busy-for 240] [--busy 1] [--test 1000]

--answers: batched answers of the same 500 val questions (profile step 3/4), copied into both
profiles so that only the timing differs (answers do not depend on the machine's speed).

Each profile is prepared by `python -m lvlm_ctrl.train controller=lookup` (what a user runs), so
its feasible range and 10-budget default grid are the lookup table's. Writes
experiments/results/disturbed_profile.json: both ranges and grids, their relative differences, the
rows re-timed, and the per-budget violation rate of the evaluation. Run it alone: it measures latency.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lvlm_ctrl.io import atomic_write_json, machine

OUT = ROOT / "outputs" / "experiments" / "disturbed_profile"
BUSY = "while True: pass"


def disturb(after: float, duration: float, n: int, log: dict) -> threading.Thread:
    """Start n busy processes `after` seconds from now, stop them `duration` seconds later."""
    def run():
        time.sleep(after)
        log["busy_from_s"] = after
        procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
        time.sleep(duration)
        for p in procs:
            p.kill()
            p.wait()
        log["busy_until_s"] = after + duration
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def prepare(name: str, answers: Path, measured: int, limit: int, busy: tuple | None) -> dict:
    from lvlm_ctrl.controllers.lookup import LookupTable
    from lvlm_ctrl.profiling import read_profile

    path = OUT / name
    if not (path / answers.name).exists():
        shutil.copytree(answers, path / answers.name)
    cmd = [sys.executable, "-m", "lvlm_ctrl.train", "controller=lookup", f"profile.path={path}",
           f"profile.measured={measured}", f"data.limit={limit}", f"hydra.run.dir={path}/lookup"]
    log: dict = {}
    t0 = time.time()
    thread = disturb(*busy, log) if busy else None
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    if thread is not None:
        thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] {' '.join(cmd)} failed")
    table = LookupTable.load(path / "lookup" / "lookup_table.json")
    lo, hi = table.feasible_range()
    df = read_profile(path / f"measured-{measured}")
    report = {"command": " ".join(["python -m lvlm_ctrl.train", *cmd[3:]]), "wall_s": round(time.time() - t0, 1),
              "disturbance": log or None, "rows": len(df), "retimed_rows": int(df["retimed"].sum()),
              "max_row_ms": float(df["T_total_ms"].max()), "feasible_ms": [lo, hi],
              "grid_ms": [float(b) for b in np.linspace(lo, hi, 10)]}
    print(f"[{name}] {report['wall_s']:.0f} s, {report['retimed_rows']} rows re-timed, feasible {lo:.1f}-{hi:.1f} ms",
          flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", required=True, type=Path)
    ap.add_argument("--measured", type=int, default=100)
    ap.add_argument("--busy-after", type=float, default=180.0)
    ap.add_argument("--busy-for", type=float, default=240.0)
    ap.add_argument("--busy", type=int, default=1, help="busy processes during the disturbance")
    ap.add_argument("--test", type=int, default=1000)
    a = ap.parse_args()
    limit = int(a.answers.name.split("-")[-1])
    quiet = prepare("quiet", a.answers, a.measured, limit, None)
    disturbed = prepare("disturbed", a.answers, a.measured, limit, (a.busy_after, a.busy_for, a.busy))
    rel = lambda x, y: abs(x - y) / y
    grid_diff = [rel(d, q) for d, q in zip(disturbed["grid_ms"], quiet["grid_ms"])]
    run_dir = OUT / "run"
    make = ["make", "-o", ".venv/.installed", "run", f"RUN={run_dir}", f"TEST={a.test}", f"ANSWERS={limit}", f"VAL={a.measured}",
            f"TRAIN_ARGS=profile.path={OUT / 'disturbed'}"]
    t0 = time.time()
    subprocess.run(make, cwd=ROOT, check=True)
    summary = json.loads((run_dir / "eval" / "eval_summary.json").read_text())
    late = {f"{r['budget_ms']:.1f}": r["violation_rate"] for r in summary["results"]}
    report = {"command": " ".join(["python experiments/disturbed_profile.py", *sys.argv[1:]]), "machine": machine(),
              "quiet": quiet, "disturbed": disturbed,
              "feasible_rel_diff": [rel(disturbed["feasible_ms"][i], quiet["feasible_ms"][i]) for i in (0, 1)],
              "grid_max_rel_diff": max(grid_diff),
              "make_run": {"command": " ".join(make), "wall_s": round(time.time() - t0, 1), "auc": summary["auc"],
                           "calibration": summary["calibration"], "violation_rate": late}}
    out = atomic_write_json(ROOT / "experiments" / "results" / "disturbed_profile.json", report)
    print(f"feasible range quiet {quiet['feasible_ms']}, disturbed {disturbed['feasible_ms']}: "
          f"differ by {max(report['feasible_rel_diff']):.1%}; grids by at most {max(grid_diff):.1%}")
    print(f"make run on the disturbed profile: AUC {summary['auc']:.4f}, late {late}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
