"""Replay GRPO checkpoints' decisions on a profile: minutes instead of a measured evaluation.

    python experiments/replay.py CKPT [CKPT ...] [--profile P] [--measured M] [--lookup T]

A profile holds the answer of every configuration on every sample, so a controller's accuracy at a
budget is read off it for the decisions the policy takes (greedy, the same as serving). Latency
comes from the profile, or, with --measured, from a measured profile (profile_bootstrap), so the
violation rates carry this machine's tails. The lookup table's decisions are replayed alongside
and its 10 budgets used. Writes outputs/experiments/replay.json. For the yardsticks' checkpoint the
replayed accuracies equal the measured evaluation's (both read the same answers); violation rates
are only an estimate. Use it to compare seeds and settings before a measured evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lvlm_ctrl.io import atomic_write_json, machine

Y = ROOT / "outputs" / "experiments" / "yardsticks"


def main() -> None:
    import hydra
    from hydra import compose, initialize_config_dir

    from lvlm_ctrl.controllers.grpo import load_policy
    from lvlm_ctrl.controllers.lookup import LookupTable
    from lvlm_ctrl.grpo.env import (
        ProfileEnv,
        budget_token_latency_tokens,
        language_features,
        latency_tokens,
        prompt_states,
    )
    from lvlm_ctrl.grpo.module import budget_auc
    from lvlm_ctrl.grpo.policy import Decision
    from lvlm_ctrl.profile_bootstrap import bootstrap
    from lvlm_ctrl.profiling import read_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--profile", default=str(Y / "profile-test-1000"))
    ap.add_argument("--measured", default=str(Y / "profile-val-300"), help="'' keeps the profile's latencies")
    ap.add_argument("--lookup", default=str(Y / "lookup" / "lookup_table.json"))
    a = ap.parse_args()

    df = read_profile(a.profile)
    if a.measured:
        df = bootstrap(df, read_profile(a.measured))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.split={df['split'].iloc[0]}", "data.limit=null"])
    backbone = hydra.utils.instantiate(cfg.model)
    env, space = ProfileEnv(df, backbone.space), backbone.space
    by_id = {s.sample_id: s for s in hydra.utils.instantiate(cfg.data).samples}
    samples = [by_id[i] for i in env.sample_ids]
    lang, tokens = language_features(backbone, [s.question for s in samples]), latency_tokens(backbone, samples)
    table = LookupTable.load(a.lookup)
    lo, hi = table.feasible_range()
    budgets = [round(lo + (hi - lo) * i / 9, 2) for i in range(10)]
    idx = torch.arange(len(env))
    states = []  # the prompts' states, for budget-token checkpoints

    def lookup(b: float) -> Decision:
        c = table.predict(b)
        n = c["num_active_blocks"] - space.num_blocks_options(c["insertion"])[0]
        ids = (space.tiers.index(c["tier"]), space.insertions.index(c["insertion"]), space.top_ks.index(c["top_k"]), n)
        return Decision(*(torch.full((len(env),), i, dtype=torch.long) for i in ids))

    def replay(decide) -> dict:
        rows = []
        for b in budgets:
            acc, lat = env.outcome(idx, decide(b))
            rows.append({"budget_ms": b, "accuracy": float(acc.mean()), "violation_rate": float((lat > b).float().mean())})
        auc = budget_auc(budgets, [torch.tensor(r["accuracy"]) for r in rows])
        return {"auc": float(auc), "results": rows}

    report = {"lookup": replay(lookup)}
    print(f"{'':>40} " + " ".join(f"{b:6.1f}" for b in budgets))
    for ck in a.ckpts:
        policy, _ = load_policy(ck)

        @torch.no_grad()
        def decide(b: float, policy=policy) -> Decision:
            budget = torch.full((len(env),), b)
            if policy.budget_token is None:
                return policy.act(lang, tokens, budget, greedy=True)
            if not states:
                states.extend(prompt_states(backbone, samples))
            per_budget = budget_token_latency_tokens(backbone, policy.budget_query(budget), states, idx)
            return policy.act(lang, per_budget, budget, greedy=True)

        report[ck] = replay(decide)
        report[ck]["min_points_vs_lookup"] = round(100 * min(
            r["accuracy"] - q["accuracy"] for r, q in zip(report[ck]["results"], report["lookup"]["results"])), 2)
    for name, r in report.items():
        print(f"{name[-40:]:>40} " + " ".join(f"{x['accuracy']:6.3f}" for x in r["results"]) + f"  auc {r['auc']:.4f}")
    out = atomic_write_json(ROOT / "outputs" / "experiments" / "replay.json",
                            {"command": " ".join(["python", *sys.argv]), "profile": a.profile, "measured": a.measured,
                             "budgets_ms": budgets, "replays": report, "machine": machine()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
