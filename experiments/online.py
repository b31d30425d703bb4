"""Online GRPO against profile-trained GRPO (issue 18's acceptance run).

    python experiments/online.py --profile-ckpt outputs/run/<make run>/train/checkpoints/best.ckpt [--limit 2000]

1. train online: python -m lvlm_ctrl.train controller=grpo budget=uniform controller.env=online
   data.limit=LIMIT (timed, the latency model's preparation included);
2. evaluate the profile-trained checkpoint and the online one on --test test questions, latency
   measured at batch 1, at the same budgets: the profile-trained checkpoint's 10 default budgets;
3. write experiments/results/online.json: wall times, the online environment's figures (rollouts
   run and read, the latency model's error at each refit) and, per budget, both controllers'
   accuracy and violation rate and their difference.
Run it alone: two shared cores skew every latency. A rerun skips the finished steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lvlm_ctrl.io import atomic_write_json, machine

OUT = ROOT / "outputs" / "experiments" / "online"


def run(name: str, args: list[str], done: Path, log: dict) -> None:
    record = done.parent / f"{name}.step.json"  # its command and wall time, for a rerun's report
    if done.exists():
        print(f"[{name}] done already: {done}")
        if record.exists():
            log[name] = json.loads(record.read_text())
        return
    print(f"[{name}] python -m {' '.join(args)}", flush=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=False)
    if proc.returncode:
        raise SystemExit(f"[{name}] exited {proc.returncode}")
    log[name] = {"command": "python -m " + " ".join(args), "wall_s": round(time.time() - t0, 1)}
    atomic_write_json(record, log[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile-ckpt", required=True, help="a profile-trained GRPO checkpoint (make run's best.ckpt)")
    ap.add_argument("--limit", type=int, default=2000, help="val questions to train online on")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("extra", nargs="*", help="more overrides for the online training run")
    a = ap.parse_args()
    out = Path(a.out)
    log: dict = {}
    train_dir = out / "train"
    run("train_online", ["lvlm_ctrl.train", "controller=grpo", "budget=uniform", "controller.env=online",
                         f"data.limit={a.limit}", f"hydra.run.dir={train_dir}", *a.extra],
        train_dir / "checkpoints" / "best.ckpt", log)
    serving = torch.load(a.profile_ckpt, map_location="cpu", weights_only=True)["serving"]
    low, high = serving["feasible_ms"]
    budgets = [round(float(b), 3) for b in torch.linspace(low, high, 10)]
    results, aucs = {}, {}
    for name, ckpt in (("profile", Path(a.profile_ckpt)), ("online", train_dir / "checkpoints" / "best.ckpt")):
        eval_dir = out / f"eval_{name}"
        run(f"eval_{name}", ["lvlm_ctrl.evaluate", "controller=grpo", f"ckpt={ckpt}", "data.split=test",
                             f"data.limit={a.test}", f"eval.budgets_ms=[{','.join(map(str, budgets))}]",
                             f"hydra.run.dir={eval_dir}"], eval_dir / "eval_summary.json", log)
        summary = json.loads((eval_dir / "eval_summary.json").read_text())
        results[name], aucs[name] = summary["results"], summary["auc"]
    rows = []
    for p, o in zip(results["profile"], results["online"]):
        rows.append({"budget_ms": p["budget_ms"], "profile_accuracy": p["accuracy"], "online_accuracy": o["accuracy"],
                     "difference": o["accuracy"] - p["accuracy"], "profile_violation": p["violation_rate"],
                     "online_violation": o["violation_rate"], "keepable": o.get("keepable", True)})
        print(f"{p['budget_ms']:7.1f} ms  profile {p['accuracy']:.3f} / {p['violation_rate']:.3f}   "
              f"online {o['accuracy']:.3f} / {o['violation_rate']:.3f}   {o['accuracy'] - p['accuracy']:+.3f}")
    env_log = train_dir / "online_env.json"
    report = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine(), "steps": log,
              "online_env": json.loads(env_log.read_text()) if env_log.exists() else None, "budgets": rows,
              "auc": aucs, "worst_difference": min(r["difference"] for r in rows),
              # a budget below the cheapest configuration's p95 during the evaluation: nothing keeps it
              "worst_online_violation_keepable": max((r["online_violation"] for r in rows if r["keepable"]), default=None)}
    prior = ROOT / "experiments" / "results" / "online.json"
    atomic_write_json(prior, report)
    print(f"wrote {prior}")


if __name__ == "__main__":
    main()
