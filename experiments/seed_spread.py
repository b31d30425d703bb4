"""How far apart two GRPO controllers trained alike land, budget by budget (the noise floor of
issue 18's "within 1 point of the profile-trained controller at every budget").

    python experiments/seed_spread.py --ckpt seed0=A/best.ckpt --ckpt seed1=B/best.ckpt [--ckpt online=C/best.ckpt]
        [--reference seed0,seed1]

Every checkpoint is served side by side in one process (experiments/online.py: side_by_side, the
controllers taking turns request by request, latency measured at batch 1) on --test test questions
at the first checkpoint's 10 default budgets. Written: per controller, per budget, its accuracy,
violation rate, 95th-percentile latency and the tiers it served, and its AUC; per pair, the
difference per budget, its largest magnitude and the number of budgets within 1 point; with
--reference (the checkpoints trained alike), per other checkpoint and budget, how far its accuracy
falls outside the reference checkpoints' range (0 inside it).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online import ROOT, default_budgets, side_by_side

from lvlm_ctrl.io import atomic_write_json, machine


def pair_differences(summary: dict, names: list[str]) -> dict:
    """Per pair (b minus a): the accuracy difference at each budget, the largest magnitude, and
    how many budgets are within 1 point."""
    out = {}
    for a, b in itertools.combinations(names, 2):
        diff = [rb["accuracy"] - ra["accuracy"] for ra, rb in zip(summary[a]["results"], summary[b]["results"])]
        out[f"{b} - {a}"] = {"difference": diff, "largest": max(abs(d) for d in diff),
                             "within_1_point": sum(abs(d) <= 0.01 for d in diff)}
    return out


def outside_range(summary: dict, reference: list[str], others: list[str]) -> dict:
    """Per checkpoint not in reference: at each budget, how far its accuracy lies below the lowest
    (negative) or above the highest (positive) of the reference checkpoints', 0 inside that range."""
    out = {}
    for name in others:
        gaps = []
        for i, r in enumerate(summary[name]["results"]):
            ref = [summary[n]["results"][i]["accuracy"] for n in reference]
            gaps.append(min(0.0, r["accuracy"] - min(ref)) + max(0.0, r["accuracy"] - max(ref)))
        out[name] = {"outside": gaps, "inside": sum(g == 0.0 for g in gaps)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", action="append", required=True, metavar="NAME=PATH",
                    help="a GRPO checkpoint to serve (two or more; the first one's feasible range sets the budgets)")
    ap.add_argument("--reference", help="comma-separated NAMEs trained alike: the range the others are placed in")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--report", default=str(ROOT / "experiments" / "results" / "seed_spread.json"))
    a = ap.parse_args()
    ckpts = {}
    for item in a.ckpt:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--ckpt {item!r}: give NAME=PATH to an existing checkpoint")
        ckpts[name] = Path(path)
    if len(ckpts) < 2:
        raise SystemExit("give two or more --ckpt NAME=PATH")
    reference = a.reference.split(",") if a.reference else []
    if reference and (set(reference) - set(ckpts) or len(reference) < 2):
        raise SystemExit(f"--reference {a.reference}: name two or more of the --ckpt names ({', '.join(ckpts)})")
    budgets = default_budgets(next(iter(ckpts.values())))
    t0 = time.time()
    summary = side_by_side(ckpts, budgets, a.test)
    names = list(ckpts)
    report = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine(), "wall_s": round(time.time() - t0, 1),
              "budgets_ms": budgets, "num_samples": summary["num_samples"], "checkpoints": summary["checkpoints"],
              **{n: {"auc": summary[n]["auc"], "accuracy": [r["accuracy"] for r in summary[n]["results"]],
                     "violation_rate": [r["violation_rate"] for r in summary[n]["results"]],
                     "p95_latency_ms": [r["p95_latency_ms"] for r in summary[n]["results"]],
                     "tiers": [r["knobs"]["tier"] for r in summary[n]["results"]],
                     "floor": summary[n]["floor"]} for n in names},
              "pairs": pair_differences(summary, names)}
    if reference:
        report["reference"] = reference
        report["outside_reference"] = outside_range(summary, reference, [n for n in names if n not in reference])
    atomic_write_json(Path(a.report), report)
    for n in names:
        print(f"{n:10s} AUC {summary[n]['auc']:.4f}  " + " ".join(f"{r['accuracy']:.3f}/{r['violation_rate']:.3f}"
                                                            for r in summary[n]["results"]))
    for pair, d in report["pairs"].items():
        print(f"{pair:20s} largest {d['largest'] * 100:.1f} pts, within 1 point at {d['within_1_point']}/{len(budgets)}: "
              + " ".join(f"{x * 100:+.1f}" for x in d["difference"]))
    for name, d in report.get("outside_reference", {}).items():
        print(f"{name:10s} inside the range of {','.join(reference)} at {d['inside']}/{len(budgets)}: "
              + " ".join(f"{x * 100:+.1f}" for x in d["outside"]))
    print(f"wrote {a.report}")


if __name__ == "__main__":
    main()
