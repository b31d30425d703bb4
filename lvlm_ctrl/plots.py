"""Plots as PNG: accuracy vs budget for controllers, and the profile's accuracy-latency scatter."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def accuracy_vs_budget(summaries: list[dict], out: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        pts = sorted((r["budget_ms"], r["accuracy"]) for r in s["results"] if r["budget_ms"] is not None)
        if not pts:
            continue
        xs, ys = zip(*pts)
        label = s["controller"] + (f" (AUC {s['auc']:.3f})" if s.get("auc") is not None else "")
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("latency budget (ms)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{summaries[0]['dataset']} / {summaries[0]['split']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def pareto_scatter(points, frontier, out: str | Path) -> Path:
    """points / frontier: DataFrames with latency_ms, accuracy, tier."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for tier, g in points.groupby("tier"):
        ax.scatter(g["latency_ms"], g["accuracy"], s=12, alpha=0.6, label=tier)
    ax.plot(frontier["latency_ms"], frontier["accuracy"], color="black", marker="x", label="Pareto frontier")
    ax.set_xlabel("median latency (ms)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out


def load_summaries(paths) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]
