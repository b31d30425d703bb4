"""Per-configuration aggregates of a profile, its Pareto frontier, and a scatter PNG.

    python -m lvlm_ctrl.profile_report profile.path=outputs/profiles/easy_vqa-val-300
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

from lvlm_ctrl.errors import cli
from lvlm_ctrl.io import atomic_write_json, atomic_write_text
from lvlm_ctrl.plots import pareto_scatter
from lvlm_ctrl.profiling import KNOB_COLUMNS, read_profile


def per_config(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby(KNOB_COLUMNS)
    out = g.agg(accuracy=("accuracy", "mean"), latency_ms=("T_total_ms", "median"),
                p95_latency_ms=("T_total_ms", lambda x: x.quantile(0.95)), vision_ms=("T_vision_ms", "median"),
                prefill_ms=("T_prefill_ms", "median"), decode_ms=("T_decode_ms", "median"),
                samples=("sample_id", "nunique")).reset_index()
    return out.sort_values("latency_ms").reset_index(drop=True)


def pareto(table: pd.DataFrame) -> pd.DataFrame:
    """Configurations no other beats on both accuracy and latency (sorted by latency)."""
    best, rows = -1.0, []
    for i, r in table.sort_values(["latency_ms", "accuracy"], ascending=[True, False]).iterrows():
        if r["accuracy"] > best:
            rows.append(i)
            best = r["accuracy"]
    return table.loc[rows].reset_index(drop=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="profile_report")
@cli
def main(cfg: DictConfig) -> None:
    df = read_profile(cfg.profile.path)
    table = per_config(df)
    front = pareto(table)
    out = Path(cfg.output_dir)
    pd.set_option("display.width", 160)
    text = (f"{len(df)} records, {df['sample_id'].nunique()} samples, {len(table)} configurations\n\n"
            f"{table.to_string(index=False, float_format=lambda x: f'{x:.3f}')}\n\nPareto frontier:\n"
            f"{front.to_string(index=False, float_format=lambda x: f'{x:.3f}')}\n")
    print(text)
    span = {"latency_ratio": float(front["latency_ms"].max() / front["latency_ms"].min()),
            "accuracy_points": float(100 * (front["accuracy"].max() - front["accuracy"].min()))}
    print(f"frontier spans {span['latency_ratio']:.2f}x in median latency and {span['accuracy_points']:.1f} accuracy points")
    atomic_write_text(out / "profile_report.txt", text)
    atomic_write_json(out / "pareto.json", {"frontier": front.to_dict("records"), "span": span})
    pareto_scatter(table, front, out / "pareto.png")
    print(f"wrote {out / 'pareto.png'}")


if __name__ == "__main__":
    main()
