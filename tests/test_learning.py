"""GRPO learns: on a profile whose best configuration at every budget is known, a few hundred steps
of the real training (Lightning Trainer, composed config, real backbone features) find it."""

import numpy as np
import pandas as pd
import pytest

from lvlm_ctrl.data import build_dataset
from lvlm_ctrl.knobs import KnobSpace
from lvlm_ctrl.profiling import write_part
from lvlm_ctrl.train import train
from tests.test_train import compose_train

N = 40
TIER = {"low": (10.0, 0.60), "medium": (18.0, 0.80), "high": (30.0, 0.95)}  # (cost, accuracy) of the full model


def known_profile() -> pd.DataFrame:
    """Every sample the same: latency and accuracy are functions of the configuration alone, so the
    best configuration within a budget is the most accurate one whose latency fits it."""
    ids = [s.sample_id for s in build_dataset("easy_vqa", "val", limit=N).samples]
    rows = []
    for k in KnobSpace().configurations():
        cost, acc = TIER[k.tier]
        latency = cost * (k.num_blocks / 16) * (0.5 + k.top_k / 16)
        accuracy = acc - 0.03 * (8 - k.top_k) - 0.04 * (16 - k.num_blocks)
        for s in ids:
            rows.append({"dataset": "easy_vqa", "split": "val", "sample_id": s, **k.as_dict(), "vision_tokens": 1,
                         "text_tokens": 8, "output_tokens": 2, "prediction": "x", "accuracy": accuracy,
                         "T_vision_ms": 1.0, "T_prefill_ms": latency - 2.0, "T_decode_ms": 1.0, "T_total_ms": latency,
                         "latency_source": "measured", "backbone": "tiny_moe", "device": "cpu", "retimed": 0})
    return pd.DataFrame(rows)


def best_within(df: pd.DataFrame, budget: float) -> float:
    per = df.groupby(["tier", "insertion", "top_k", "num_blocks"])[["T_total_ms", "accuracy"]].first()
    fits = per[per["T_total_ms"] <= budget]
    return float(fits["accuracy"].max()) if len(fits) else 0.0


@pytest.mark.slow
def test_grpo_finds_the_best_configuration_at_every_budget(tmp_path):
    df = known_profile()
    write_part(tmp_path / "profile" / "shard0", "part-0.parquet", df.to_dict("records"))
    lo, hi = df.groupby(["tier", "insertion", "top_k", "num_blocks"])["T_total_ms"].first().agg(["min", "max"])
    budgets = np.linspace(lo, hi, 10)
    best = [best_within(df, b) for b in budgets]
    oracle_auc = float(np.trapezoid(best, budgets) / (budgets[-1] - budgets[0]))
    common = ["controller=grpo", f"profile.path={tmp_path / 'profile'}", f"data.limit={N}", "logger=csv",
              "controller.stage2_warmup_steps=100", "controller.reward.slo=0", "profile.batch_size=16",
              "trainer.val_check_interval=50"]
    untrained = train(compose_train(tmp_path / "untrained", *common, "trainer.max_steps=1",
                                    "controller.lr=1e-12"))
    learned = train(compose_train(tmp_path / "learned", *common, "trainer.max_steps=400"))
    assert learned >= oracle_auc - 0.02, (learned, oracle_auc)
    assert untrained < oracle_auc - 0.1, (untrained, oracle_auc)  # the bar is not met by chance
