"""profile_bootstrap: answers from one profile, latencies as measured in another."""

import pandas as pd
import pytest

from lvlm_ctrl.errors import UserError
from lvlm_ctrl.profile_bootstrap import bootstrap, main
from lvlm_ctrl.profiling import SCHEMA, read_profile, write_part

CONFIGS = [("low", 1, 4, 12), ("high", 5, 8, 16)]


def records(samples, latency, source, accuracy=1.0, vision_tokens=lambda s: 1):
    """The stages sum to the total, as the profiler records them (vision 1 ms, decode 3, prefill the rest)."""
    return [{"dataset": "easy_vqa", "split": "val", "sample_id": s, "tier": t, "insertion": p, "top_k": k,
             "num_blocks": n, "vision_tokens": vision_tokens(s), "text_tokens": 5, "output_tokens": 2,
             "prediction": "red", "accuracy": accuracy, "T_vision_ms": 1.0, "T_prefill_ms": latency(s, t) - 4.0,
             "T_decode_ms": 3.0, "T_total_ms": latency(s, t), "latency_source": source, "backbone": "tiny_moe",
             "device": "cpu"}
            for s in samples for t, p, k, n in CONFIGS]


def measured_latency(s, tier):
    return 10.0 * (int(s[1:]) + 1) + (0.0 if tier == "low" else 100.0)


def test_measured_samples_keep_their_own_latency_and_the_rest_draw_one(tmp_path):
    answers = pd.DataFrame(records([f"s{i}" for i in range(20)], lambda s, t: 7.0, "predicted", accuracy=0.5))
    measured = pd.DataFrame(records(["s0", "s1", "s2"], measured_latency, "measured"))
    out = bootstrap(answers, measured, seed=0)
    assert len(out) == len(answers) and list(out.columns) == SCHEMA.names
    assert (out["accuracy"] == 0.5).all()  # the answers are the answering profile's
    lat = out.set_index(["sample_id", "tier"])["T_total_ms"]
    for s in ("s0", "s1", "s2"):
        assert lat[(s, "low")] == measured_latency(s, "low")
    donors = {round(lat[(f"s{i}", "low")] / 10) - 1 for i in range(3, 20)}
    assert donors <= {0, 1, 2} and len(donors) > 1  # drawn from the measured samples, not all one
    for i in range(3, 20):  # a donor lends its whole row: the high tier is the same sample's
        assert lat[(f"s{i}", "high")] == lat[(f"s{i}", "low")] + 100.0
    assert out.equals(bootstrap(answers, measured, seed=0))
    assert not out.equals(bootstrap(answers, measured, seed=1))


def test_an_unmeasured_sample_costs_what_its_own_tokens_cost():
    """Latency grows with vision tokens on the measured samples; an unmeasured sample with many tokens
    gets a latency for its own count (the latency model's prediction plus a donor's residual), not a
    small donor's."""
    tokens = {"s0": 10, "s1": 20, "s2": 30, "s3": 40, "s4": 50, "big": 100, "small": 10}

    def latency(s, tier):  # 0.5 ms per vision token, +-0.25 ms of noise per sample
        return 5.0 + 0.5 * tokens[s] + (0.25 if s in ("s1", "s3") else -0.25 if s in ("s2", "s4") else 0.0) + (
            0.0 if tier == "low" else 100.0)

    measured = pd.DataFrame(records([f"s{i}" for i in range(5)], latency, "measured",
                                    vision_tokens=tokens.__getitem__))
    answers = pd.DataFrame(records(["big", "small", "s2"], lambda s, t: 7.0, "predicted",
                                   vision_tokens=tokens.__getitem__))
    lat = bootstrap(answers, measured, seed=0).set_index(["sample_id", "tier"])
    assert lat.loc[("s2", "low"), "T_total_ms"] == latency("s2", "low")  # its own, untouched
    for tier in ("low", "high"):
        base = 100.0 if tier == "high" else 0.0
        assert abs(lat.loc[("big", tier), "T_total_ms"] - (55.0 + base)) <= 0.5
        assert abs(lat.loc[("small", tier), "T_total_ms"] - (10.0 + base)) <= 0.5
    row = lat.loc[("big", "low")]
    assert row["T_total_ms"] == pytest.approx(row["T_vision_ms"] + row["T_prefill_ms"] + row["T_decode_ms"])


def test_a_configuration_never_measured_is_a_clear_error():
    answers = pd.DataFrame(records(["s0", "s5"], lambda s, t: 7.0, "predicted"))
    measured = pd.DataFrame(records(["s0"], measured_latency, "measured")[:1])  # the low tier only
    with pytest.raises(UserError, match="no measured latency"):
        bootstrap(answers, measured)


def test_cli_writes_a_profile_that_reads_back(tmp_path, capsys):
    write_part(tmp_path / "answers", "a.parquet", records(["s0", "s1", "s9"], lambda s, t: 7.0, "predicted"))
    write_part(tmp_path / "measured", "m.parquet", records(["s0", "s1"], measured_latency, "measured"))
    out = tmp_path / "boot.parquet"
    main([str(tmp_path / "answers"), str(tmp_path / "measured"), str(out)])
    df = read_profile(out)
    assert len(df) == 6 and set(df["latency_source"]) == {"measured-bootstrap"}
    assert "3 samples, 2 with their own latency" in capsys.readouterr().out
