"""Online GRPO against profile-trained GRPO (issue 18's acceptance run).

    python experiments/online.py --profile-ckpt outputs/run/<make run>/train/checkpoints/best.ckpt [--limit 2000]

1. train online: python -m lvlm_ctrl.train controller=grpo budget=uniform controller.env=online
   data.limit=LIMIT (timed, the latency model's preparation included), or take --online-ckpt;
2. evaluate the profile-trained checkpoint and the online one side by side in one process, the two
   taking turns request by request (two evaluations one after the other saw machines up to 1.6x
   apart), on --test test questions, latency measured at batch 1, at the profile-trained
   checkpoint's 10 default budgets (lvlm_ctrl.evaluate's serving, warm-up and floor probe);
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

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import lvlm_ctrl  # noqa: F401  (registers the config's resolvers)
from lvlm_ctrl.controllers import serving_controller
from lvlm_ctrl.evaluate import auc, floor_probe, keepable, run_requests, summarize, warm_up
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


def default_budgets(ckpt: str | Path) -> list[float]:
    """A GRPO checkpoint's 10 default budgets: its feasible range, evenly."""
    low, high = torch.load(ckpt, map_location="cpu", weights_only=True)["serving"]["feasible_ms"]
    return [round(float(b), 3) for b in torch.linspace(low, high, 10)]


def side_by_side(ckpts: dict[str, Path], budgets: list[float], test: int,
                 serving: dict[str, list[str]] | None = None) -> dict:
    """GRPO checkpoints served in one process on one backbone, taking turns request by request at
    every budget, each with its own latency calibration (and its own evaluate overrides,
    `serving[name]`); the floor probe (the cheapest configuration, once per question) marks the
    budgets no controller could keep."""
    overrides = ["controller=grpo", "data.split=test", f"data.limit={test}"]
    serving = serving or {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfgs = {name: compose("evaluate", overrides=[*overrides, f"ckpt={ckpt}", *serving.get(name, [])])
                for name, ckpt in ckpts.items()}
    cfg = next(iter(cfgs.values()))
    backbone = hydra.utils.instantiate(cfg.model)
    dataset = hydra.utils.instantiate(cfg.data)
    controllers = {name: serving_controller(c, backbone) for name, c in cfgs.items()}
    for controller in controllers.values():
        warm_up(backbone, controller, dataset.samples, budgets[-1], cfg.eval.warmup)
    records, probes = run_requests(backbone, controllers, dataset.samples, budgets,
                                   floor_probe(backbone, next(iter(controllers.values()))))
    summary = {"budgets_ms": budgets, "num_samples": len(dataset), "checkpoints": {k: str(v) for k, v in ckpts.items()}}
    for name, controller in controllers.items():
        results = [summarize(records[name][b], b) for b in budgets]
        floor = keepable(results, probes, float(np.median([r["controller_overhead_ms"] for r in results])))
        summary[name] = {"results": results, "auc": auc(results), "floor": floor,
                         "calibration": controller.calibration.state()}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile-ckpt", required=True, help="a profile-trained GRPO checkpoint (make run's best.ckpt)")
    ap.add_argument("--limit", type=int, default=2000, help="val questions to train online on")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--report", default=str(ROOT / "experiments" / "results" / "online.json"))
    ap.add_argument("--online-ckpt", help="an online-trained checkpoint to evaluate instead of training one")
    ap.add_argument("extra", nargs="*", help="more overrides for the online training run")
    a = ap.parse_args()
    out = Path(a.out)
    log: dict = {}
    train_dir = out / "train"
    if not a.online_ckpt:
        run("train_online", ["lvlm_ctrl.train", "controller=grpo", "budget=uniform", "controller.env=online",
                             f"data.limit={a.limit}", f"hydra.run.dir={train_dir}", *a.extra],
            train_dir / "checkpoints" / "best.ckpt", log)
    online_ckpt = Path(a.online_ckpt) if a.online_ckpt else train_dir / "checkpoints" / "best.ckpt"
    budgets = default_budgets(a.profile_ckpt)
    done = out / "eval_side_by_side.json"
    ckpts = {"profile": Path(a.profile_ckpt), "online": online_ckpt}
    summary = json.loads(done.read_text()) if done.exists() else None
    # a finished evaluation is reused only for the same checkpoints, budgets and test questions
    if summary is None or (summary["checkpoints"], summary["budgets_ms"], summary["num_samples"]) != \
            ({k: str(v) for k, v in ckpts.items()}, budgets, a.test):
        t0 = time.time()
        summary = side_by_side(ckpts, budgets, a.test)
        summary["wall_s"] = round(time.time() - t0, 1)
        atomic_write_json(done, summary)
    else:
        print(f"[eval_side_by_side] done already: {done}")
    log["eval_side_by_side"] = {"wall_s": summary["wall_s"], "floor": summary["profile"]["floor"]}
    results = {name: summary[name]["results"] for name in ("profile", "online")}
    aucs = {name: summary[name]["auc"] for name in ("profile", "online")}
    rows = []
    for p, o in zip(results["profile"], results["online"]):
        rows.append({"budget_ms": p["budget_ms"], "profile_accuracy": p["accuracy"], "online_accuracy": o["accuracy"],
                     "difference": o["accuracy"] - p["accuracy"], "profile_violation": p["violation_rate"],
                     "online_violation": o["violation_rate"], "keepable": o.get("keepable", True)})
        print(f"{p['budget_ms']:7.1f} ms  profile {p['accuracy']:.3f} / {p['violation_rate']:.3f}   "
              f"online {o['accuracy']:.3f} / {o['violation_rate']:.3f}   {o['accuracy'] - p['accuracy']:+.3f}")
    env_log = online_ckpt.parent.parent / "online_env.json"
    report = {"command": " ".join([sys.executable, *sys.argv]), "machine": machine(), "steps": log,
              "online_env": json.loads(env_log.read_text()) if env_log.exists() else None, "budgets": rows,
              "auc": aucs, "worst_difference": min(r["difference"] for r in rows),
              # a budget below the cheapest configuration's p95 during the evaluation: nothing keeps it
              "worst_online_violation_keepable": max((r["online_violation"] for r in rows if r["keepable"]), default=None)}
    atomic_write_json(Path(a.report), report)
    print(f"wrote {a.report}")


if __name__ == "__main__":
    main()
