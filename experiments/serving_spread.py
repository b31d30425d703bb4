"""How wide is a request's latency spread at batch 1, and what widens it (issue 18's tails)?

    python experiments/serving_spread.py [--requests 600] [--latency-model PATH]

Requests run one after another as serving runs them (no other work between), on random val
questions, at configurations drawn from a pool: one configuration over and over (as a profile
times a configuration's samples back to back), three taking turns, or all 225 at random (as a
controller's choices vary). Each request's latency is divided by the latency model's prediction
for its own tokens, then by the median of its 25 neighbours (the machine's drift out, as the online
environment does); the spread is p95 / median of that ratio. Last, as the online environment
times its pairs: after each engine batch of 8 samples x 16 configurations, 8 single requests at
random configurations.
Writes experiments/results/serving_spread.json with the command and the machine. Run it alone.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lvlm_ctrl.backbone import load_backbone
from lvlm_ctrl.backbone.rollout import RolloutEngine
from lvlm_ctrl.data import build_dataset
from lvlm_ctrl.grpo.online import local_speed
from lvlm_ctrl.io import atomic_write_json, machine
from lvlm_ctrl.latency_model import LatencyModel


def spread(ratios: np.ndarray) -> dict:
    local = ratios / local_speed(ratios, 25)
    return {"p95_over_median": round(float(np.quantile(local, 0.95) / np.median(local)), 3),
            "p99_over_median": round(float(np.quantile(local, 0.99) / np.median(local)), 3),
            "raw_p95_over_median": round(float(np.quantile(ratios, 0.95) / np.median(ratios)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=600, help="per pool")
    ap.add_argument("--latency-model", default=str(ROOT / "outputs/profiles/tiny_moe/easy_vqa-val-2000/latency_model.json"),
                    help="latency_model.json of a measured profile (an online run's first fit)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "serving_spread.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    bb = load_backbone(tiers={"low": 8, "medium": 32, "high": 64})
    model = LatencyModel.load(a.latency_model)
    samples = build_dataset("easy_vqa", split="val", limit=2000).samples
    space = bb.space.configurations()
    rng = random.Random(0)
    engine = RolloutEngine(bb)

    def ratio(sample, k) -> float:
        g = bb.generate([sample.load_image()], [sample.question], k)
        p = model.predict(k.tier, k.insertion, k.top_k, k.num_blocks, int(g.vision_tokens[0]),
                          int(g.text_tokens[0]), int(g.output_tokens[0]))
        return g.total_ms / p["T_total_ms"]

    for k in (bb.space.full(), bb.space.cheapest()):  # warm-up
        ratio(samples[0], k)
    pools = {"one configuration": space[len(space) // 2:len(space) // 2 + 1],
             "three taking turns": space[::len(space) // 3][:3], "all at random": space}
    results = {}
    for name, pool in pools.items():
        results[name] = spread(np.array([ratio(rng.choice(samples), rng.choice(pool)) for _ in range(a.requests)]))
        print(name, results[name], flush=True)
    between = []
    while len(between) < a.requests:  # as the online environment times: single requests between engine batches
        rows = rng.sample(samples, 8)
        engine.run([s.load_image() for s in rows], [s.question for s in rows],
                   [[rng.choice(space) for _ in range(16)] for _ in rows])
        between += [ratio(rng.choice(rows), rng.choice(space)) for _ in range(8)]
    results["all at random, between engine batches"] = spread(np.array(between))
    print("between engine batches", results["all at random, between engine batches"], flush=True)
    atomic_write_json(a.out, {"command": " ".join(["python experiments/serving_spread.py", *sys.argv[1:]]),
                              "requests_per_pool": a.requests, "latency_model": a.latency_model,
                              "spread": results, "machine": machine()})


if __name__ == "__main__":
    main()
