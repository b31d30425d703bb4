"""A latency model fitted on profile records: per configuration and stage, linear in tokens.

    python -m lvlm_ctrl.latency_model profile.path=outputs/profiles/easy_vqa-val-300

T_stage = a + b * vision_tokens + c * text_tokens + d * output_tokens, least squares per
(configuration, stage); a configuration with too few records falls back to its tier's fit. Samples
are split by id into fit / held-out; the mean absolute percentage error of T_total on the held-out
samples is reported (and saved) against measured latency.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import atomic_write_json, check_writable, command, machine
from lvlm_ctrl.profiling import KNOB_COLUMNS, read_profile

STAGES = ["T_vision_ms", "T_prefill_ms", "T_decode_ms"]
FEATURES = ["vision_tokens", "text_tokens", "output_tokens"]


def config_key(tier, insertion, top_k, num_blocks) -> str:
    return f"{tier}/{int(insertion)}/{int(top_k)}/{int(num_blocks)}"


def _fit(group: pd.DataFrame) -> dict:
    x = np.column_stack([np.ones(len(group))] + [group[f].to_numpy(float) for f in FEATURES])
    coefs = {}
    for stage in STAGES:
        # lstsq gives the minimum-norm solution where a feature is constant (vision tokens per tier)
        coefs[stage] = np.linalg.lstsq(x, group[stage].to_numpy(float), rcond=None)[0].tolist()
    return {"coefs": coefs, "mean_output_tokens": float(group["output_tokens"].mean()), "n": len(group)}


class LatencyModel:
    def __init__(self, configs: dict, tiers: dict, meta: dict | None = None):
        self.configs, self.tiers, self.meta = configs, tiers, meta or {}

    @classmethod
    def fit(cls, df: pd.DataFrame, min_records: int = 5) -> LatencyModel:
        df = df[df["latency_source"].fillna("measured") == "measured"] if "latency_source" in df else df
        if df.empty:
            raise UserError("no measured records to fit a latency model on; profile with latency=measured")
        configs = {config_key(*k): _fit(g) for k, g in df.groupby(KNOB_COLUMNS) if len(g) >= min_records}
        tiers = {t: _fit(g) for t, g in df.groupby("tier")}
        return cls(configs, tiers, {"num_records": len(df)})

    def _entry(self, tier, insertion, top_k, num_blocks) -> dict:
        entry = self.configs.get(config_key(tier, insertion, top_k, num_blocks)) or self.tiers.get(tier)
        if entry is None:
            raise UserError(f"latency model knows no configuration with tier {tier!r}; refit it on a profile "
                            "that covers this tier")
        return entry

    def predict(self, tier, insertion, top_k, num_blocks, vision_tokens, text_tokens, output_tokens=None) -> dict:
        entry = self._entry(tier, insertion, top_k, num_blocks)
        out_tok = entry["mean_output_tokens"] if output_tokens is None else output_tokens
        x = np.array([1.0, vision_tokens, text_tokens, out_tok])
        stages = {s: float(max(0.0, x @ np.array(entry["coefs"][s]))) for s in STAGES}
        stages["T_total_ms"] = sum(stages.values())
        return stages

    def coefficients(self, configs: list) -> tuple:
        """For Knobs `configs`: (C, stages, 1 + features) coefficients and (C,) mean output tokens,
        as torch tensors (float64), for predicting many requests at once."""
        entries = [self._entry(k.tier, k.insertion, k.top_k, k.num_blocks) for k in configs]
        coefs = torch.tensor([[e["coefs"][s] for s in STAGES] for e in entries], dtype=torch.float64)
        return coefs, torch.tensor([e["mean_output_tokens"] for e in entries], dtype=torch.float32)

    def predict_record(self, r: dict) -> dict:
        return self.predict(*(r[k] for k in KNOB_COLUMNS), r["vision_tokens"], r["text_tokens"], r["output_tokens"])

    def predict_frame(self, df: pd.DataFrame) -> np.ndarray:
        return self.predict_stages(df)["T_total_ms"]

    def predict_stages(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Every stage's and the total's predicted latency for each record of df, one matmul per configuration."""
        out = {s: np.zeros(len(df)) for s in [*STAGES, "T_total_ms"]}
        if df.empty:
            return out
        for key, rows in df.groupby(KNOB_COLUMNS, sort=False).indices.items():
            entry = self._entry(*key)
            group = df.iloc[rows]
            x = np.column_stack([np.ones(len(rows))] + [group[f].to_numpy(float) for f in FEATURES])
            for s in STAGES:
                out[s][rows] = np.maximum(0.0, x @ np.array(entry["coefs"][s]))
        out["T_total_ms"] = sum(out[s] for s in STAGES)
        return out

    def to_dict(self) -> dict:
        return {"features": ["bias", *FEATURES], "stages": STAGES, "configs": self.configs, "tiers": self.tiers,
                "meta": self.meta}

    def save(self, path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> LatencyModel:
        path = Path(str(path))
        if not path.exists():
            raise UserError(f"latency model not found at {path}: fit one with python -m lvlm_ctrl.latency_model")
        try:
            data = json.loads(path.read_text())
            model = cls(data["configs"], data["tiers"], data.get("meta"))
            for entry in list(model.configs.values()) + list(model.tiers.values()):
                if any(len(entry["coefs"][s]) != 1 + len(FEATURES) for s in STAGES):
                    raise ValueError("coefficient vectors have the wrong length")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"malformed latency model {path}: {err}; refit with python -m lvlm_ctrl.latency_model") from None
        return model


def held_out_mask(sample_ids: pd.Series, fraction: float) -> np.ndarray:
    """Deterministic split by sample id, so every configuration of a sample falls on one side."""
    return np.array([zlib.crc32(str(s).encode()) % 1000 < fraction * 1000 for s in sample_ids])


def mape(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true) / np.maximum(true, 1e-9)))


def fit_and_report(df: pd.DataFrame, held_out: float, required: bool = True) -> tuple[LatencyModel, float | None]:
    """Fit on all but the held-out samples (by id); -> the model and its MAPE of T_total on those.
    With too few samples to hold some out: an error, or (required=False) a fit on all and no MAPE."""
    held = held_out_mask(df["sample_id"], held_out)
    if held.all() or not held.any():
        if required:
            raise UserError("too few samples to hold some out; profile more samples or change held_out")
        return LatencyModel.fit(df), None
    model = LatencyModel.fit(df[~held])
    test = df[held]
    err = mape(model.predict_frame(test), test["T_total_ms"].to_numpy(float))
    model.meta.update({"held_out_mape": err, "held_out_records": int(held.sum()), "command": command(
        "lvlm_ctrl.latency_model"), "machine": machine()})
    return model, err


@hydra.main(version_base="1.3", config_path="../conf", config_name="latency_model")
@cli
def main(cfg: DictConfig) -> float:
    check_writable(Path(cfg.output).parent)
    model, err = fit_and_report(read_profile(cfg.profile.path), cfg.held_out)
    model.meta["profile"] = str(cfg.profile.path)
    out = model.save(Path(cfg.output))
    print(f"held-out MAPE of T_total: {err * 100:.2f}% over {model.meta['held_out_records']} records; wrote {out}")
    return err


if __name__ == "__main__":
    main()
