"""Rollouts per second three ways, same answers (issue 18): GRPO's group of G configurations per
sample, and a profile's every configuration of a chunk of samples, on the embedded default.

    python experiments/rollouts.py [--samples 64] [--group 16] [--profile-samples 32] [--rounds 2]

  seed     the seed's loop: one request at a time, batch 1 (Backbone.generate)
  batched  the batching before the engine: each configuration's requests in one generate call
  engine   the rollout engine (backbone/rollout.py): vision and blocks [0, p) shared, every
           configuration of a tier's batch in one continuation per p and one decode

batched runs transformers' grouped_mm experts kernel, the engine its own (backbone/experts.py: the
picks that carry weight alone); seed runs the serving kernel, batch 1.

Each way runs `rounds` times in the order seed, batched, engine, engine, batched, seed, ... so that
the machine's drift over minutes falls on all alike; the rate is total rollouts / total seconds.
Writes experiments/results/rollouts.json with the command and the machine. Run it alone.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lvlm_ctrl.backbone import experts_implementation, load_backbone
from lvlm_ctrl.backbone.rollout import RolloutEngine
from lvlm_ctrl.data import build_dataset
from lvlm_ctrl.io import atomic_write_json, machine


def seed_loop(bb, images, questions, configs):
    return {(i, k): bb.generate([images[i]], [questions[i]], k).token_ids[0]
            for i, ks in enumerate(configs) for k in ks}


def batched(bb, images, questions, configs, batch_size=64):
    by = defaultdict(list)
    for i, ks in enumerate(configs):
        for k in dict.fromkeys(ks):
            by[k].append(i)
    out = {}
    with experts_implementation(bb.model, "grouped_mm"):
        for k, rows in by.items():
            for s in range(0, len(rows), batch_size):
                part = rows[s:s + batch_size]
                gen = bb.generate([images[i] for i in part], [questions[i] for i in part], k)
                out.update({(i, k): t for i, t in zip(part, gen.token_ids)})
    return out


def engine(bb, images, questions, configs):
    out = RolloutEngine(bb).run(images, questions, configs)
    return {key: gen.token_ids[row] for key, (gen, row) in out.items()}


WAYS = {"seed": seed_loop, "batched": batched, "engine": engine}


def compare(bb, images, questions, configs, ways, rounds):
    """-> {way: rollouts/s}, and whether every way gave the same tokens for every rollout."""
    seconds, answers = defaultdict(float), {}
    n = len({(i, k) for i, ks in enumerate(configs) for k in ks})
    order = []
    for r in range(rounds):
        order += ways if r % 2 == 0 else ways[::-1]
    for way in order:
        t = time.perf_counter()
        answers[way] = WAYS[way](bb, images, questions, configs)
        seconds[way] += time.perf_counter() - t
        print(f"  {way}: {n / (time.perf_counter() - t):.1f} rollouts/s", flush=True)
    same = all(answers[w] == answers[ways[0]] for w in ways)
    return {w: round(rounds * n / seconds[w], 2) for w in ways}, n, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--profile-samples", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "rollouts.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bb = load_backbone(tiers={"low": 8, "medium": 32, "high": 64})
    samples = build_dataset("easy_vqa", split="val", limit=max(a.samples, a.profile_samples)).samples
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    space = bb.space.configurations()
    for k in (bb.space.full(), bb.space.cheapest()):  # warm-up
        bb.generate(images[:2], questions[:2], k)
    rng = random.Random(0)
    group = [[rng.choice(space) for _ in range(a.group)] for _ in range(a.samples)]
    print(f"GRPO groups: {a.samples} samples x G={a.group} configurations drawn uniformly", flush=True)
    g_rate, g_n, g_same = compare(bb, images[:a.samples], questions[:a.samples], group, list(WAYS), a.rounds)
    print(f"profile: {a.profile_samples} samples x {len(space)} configurations", flush=True)
    prof = [list(space)] * a.profile_samples
    p_rate, p_n, p_same = compare(bb, images[:a.profile_samples], questions[:a.profile_samples], prof,
                                  ["batched", "engine"], a.rounds)
    report = {
        "command": " ".join(["python experiments/rollouts.py", *sys.argv[1:]]),
        "backbone": "tiny_moe (embedded default), tiers low 8 / medium 32 / high 64 px",
        "settings": {"batched": "64 requests per generate call, grouped_mm", "seed": "batch 1, serving kernel",
                     "engine": "RolloutEngine defaults (64 samples per prefill, 1024 pairs per decode), picked_mm"},
        "grpo_groups": {"rollouts": g_n, "rollouts_per_s": g_rate, "same_answers": g_same,
                        "engine_vs_seed": round(g_rate["engine"] / g_rate["seed"], 2),
                        "engine_vs_batched": round(g_rate["engine"] / g_rate["batched"], 2)},
        "profile": {"rollouts": p_n, "rollouts_per_s": p_rate, "same_answers": p_same,
                    "engine_vs_batched": round(p_rate["engine"] / p_rate["batched"], 2)},
        "targets": {"engine_vs_seed": ">= 10", "engine_vs_batched": ">= 1.5"},
        "machine": machine(), "threads": a.threads, "rounds": a.rounds,
    }
    atomic_write_json(a.out, report)
    print({k: report[k] for k in ("grpo_groups", "profile")})


if __name__ == "__main__":
    main()
