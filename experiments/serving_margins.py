"""Serving margins allowed below 1: does loosening a careful controller close its gap?

    python experiments/serving_margins.py --profile-ckpt P --online-ckpt O [--online-ckpt O2 ...]

Serves, side by side in one process (experiments/online.py's evaluation: 1,000 test questions, the
profile-trained checkpoint's 10 default budgets, measured latency), the profile-trained checkpoint
with today's calibration (margins >= 1) and, with `calibration.min_margin` and `calibration.target`
as given, the profile-trained checkpoint again and each online checkpoint. Writes
experiments/results/serving_margins.json (command, machine, per controller and budget: accuracy,
violation rate, the knobs chosen; the margins at the end). Run it alone: 4 controllers take ~28 min.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online import ROOT, default_budgets, side_by_side

from lvlm_ctrl.io import atomic_write_json, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile-ckpt", required=True)
    ap.add_argument("--online-ckpt", action="append", required=True, help="repeat for several")
    ap.add_argument("--min-margin", type=float, default=0.8)
    ap.add_argument("--target", type=float, default=0.04)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--report", default=str(ROOT / "experiments" / "results" / "serving_margins.json"))
    a = ap.parse_args()
    loose = [f"calibration.min_margin={a.min_margin}", f"calibration.target={a.target}"]
    ckpts = {"profile": Path(a.profile_ckpt), "profile_loose": Path(a.profile_ckpt)}
    ckpts.update({f"online{i}_loose": Path(c) for i, c in enumerate(a.online_ckpt)})
    serving = {name: loose for name in ckpts if name.endswith("_loose")}
    budgets = default_budgets(a.profile_ckpt)
    t0 = time.time()
    summary = side_by_side(ckpts, budgets, a.test, serving)
    report = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
              "wall_s": round(time.time() - t0, 1), "serving": serving, "budgets_ms": budgets}
    for name, ckpt in ckpts.items():
        s = summary[name]
        report[name] = {"checkpoint": str(ckpt), "auc": s["auc"], "margins": s["calibration"]["margins"],
                        "results": [{k: r[k] for k in ("budget_ms", "accuracy", "violation_rate", "median_latency_ms",
                                                         "knobs", "keepable")} for r in s["results"]]}
    atomic_write_json(Path(a.report), report)
    for name in ckpts:
        print(f"{name:16s} AUC {report[name]['auc']:.4f}")
    for i, b in enumerate(budgets):
        print(f"{b:6.1f} ms  " + "  ".join(f"{n} {report[n]['results'][i]['accuracy']:.3f}/"
                                          f"{report[n]['results'][i]['violation_rate']:.3f}" for n in ckpts))
    print(f"wrote {a.report}")


if __name__ == "__main__":
    main()
