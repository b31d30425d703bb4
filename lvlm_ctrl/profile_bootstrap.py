"""More questions for the controllers to learn from, with latencies as measured.

    python -m lvlm_ctrl.profile_bootstrap ANSWERS MEASURED OUT [--seed 0]

A measured profile (latency timed at batch 1) costs a quarter of an hour per 200 questions here;
answers at every configuration, batched with latency=predicted, cost a tenth of that. This joins
the two: the records (answers, accuracy, token counts) of ANSWERS, with the latency columns of
MEASURED at the same configuration: a sample's own where it was measured; otherwise a measured
sample is drawn at random (seeded) and its residual against a latency model fitted on MEASURED
(measured minus predicted, per stage) is added to what the model predicts for the sample's own
vision, text and output token counts. So an unmeasured sample costs what its own tokens cost (a big
image more than a small one, a long answer more than a short one) and the latency tails stay those
of the machine. OUT is a profile like any other (train controller=lookup or grpo, profile_report).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import atomic_write_bytes, check_writable
from lvlm_ctrl.latency_model import FEATURES, STAGES, LatencyModel
from lvlm_ctrl.profiling import KNOB_COLUMNS, SCHEMA, read_profile, with_optional_columns

LATENCY = ["T_vision_ms", "T_prefill_ms", "T_decode_ms", "T_total_ms", "device", "retimed"]
DONOR = "donor_"


def bootstrap(answers: pd.DataFrame, measured: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    if set(answers["backbone"]) != set(measured["backbone"]):
        raise UserError(f"the profiles come from different backbones ({sorted(set(answers['backbone']))} vs "
                        f"{sorted(set(measured['backbone']))}); bootstrap a profile of the same backbone")
    answers, measured = with_optional_columns(answers), with_optional_columns(measured)
    own = set(measured["sample_id"])
    rng = np.random.default_rng(seed)
    ids = sorted(set(answers["sample_id"]))
    drawn = rng.choice(sorted(own), size=len(ids))
    donor = {s: s if s in own else d for s, d in zip(ids, drawn)}
    # the donor's token counts come along: its residual is taken against its own tokens
    lat = measured[["sample_id", *KNOB_COLUMNS, *LATENCY, *FEATURES]].rename(
        columns={"sample_id": "donor", **{f: DONOR + f for f in FEATURES}})
    out = answers.drop(columns=LATENCY).assign(donor=answers["sample_id"].map(donor))
    out = out.merge(lat, on=["donor", *KNOB_COLUMNS], how="left", validate="many_to_one")
    gaps = out["T_total_ms"].isna()
    if gaps.any():
        r = out[gaps].iloc[0]
        raise UserError(f"{int(gaps.sum())} records have no measured latency (e.g. sample {r['donor']} at "
                        f"{tuple(r[c] for c in KNOB_COLUMNS)}): profile every configuration of the measured samples")
    borrowed = (out["donor"] != out["sample_id"]).to_numpy()
    if borrowed.any():
        model = LatencyModel.fit(measured)
        rows = out[borrowed]
        own = model.predict_stages(rows)
        theirs = model.predict_stages(rows[KNOB_COLUMNS + [DONOR + f for f in FEATURES]].rename(
            columns={DONOR + f: f for f in FEATURES}))
        for stage in STAGES:
            out.loc[borrowed, stage] = np.maximum(0.0, rows[stage].to_numpy(float) - theirs[stage] + own[stage])
        out.loc[borrowed, "T_total_ms"] = out.loc[borrowed, STAGES].sum(axis=1)
    return out.assign(latency_source="measured-bootstrap")[SCHEMA.names]


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lvlm_ctrl.profile_bootstrap", description=__doc__.splitlines()[0])
    ap.add_argument("answers", help="a profile with answers at every configuration (latency=predicted is fine)")
    ap.add_argument("measured", help="a profile with measured latency of the same backbone")
    ap.add_argument("out", help="the profile to write (one Parquet file)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if Path(a.out).is_dir():
        raise UserError(f"{a.out} is a directory: give the path of the Parquet file to write, e.g. {a.out}/profile.parquet")
    check_writable(Path(a.out).parent)
    measured = read_profile(a.measured)
    df = bootstrap(read_profile(a.answers), measured, a.seed)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), sink)
    atomic_write_bytes(a.out, sink.getvalue().to_pybytes())
    own = df.loc[df["sample_id"].isin(set(measured["sample_id"])), "sample_id"].nunique()
    print(f"wrote {a.out}: {len(df)} records, {df['sample_id'].nunique()} samples, {own} with their own latency")


if __name__ == "__main__":
    main()
