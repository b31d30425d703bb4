"""Profile records: the schema, and reading / writing / merging Parquet parts.

One record per (sample, configuration). A profile is a Parquet file or a directory of parts, each
part written atomically, so a crash loses at most the part in flight and a rerun skips what is there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lvlm_ctrl.errors import UserError

KNOB_COLUMNS = ["tier", "insertion", "top_k", "num_blocks"]
SCHEMA = pa.schema([
    ("dataset", pa.string()), ("split", pa.string()), ("sample_id", pa.string()),
    ("tier", pa.string()), ("insertion", pa.int16()), ("top_k", pa.int16()), ("num_blocks", pa.int16()),
    ("vision_tokens", pa.int32()), ("text_tokens", pa.int32()), ("output_tokens", pa.int32()),
    ("prediction", pa.string()), ("accuracy", pa.float64()),
    ("T_vision_ms", pa.float64()), ("T_prefill_ms", pa.float64()), ("T_decode_ms", pa.float64()),
    ("T_total_ms", pa.float64()), ("latency_source", pa.string()), ("backbone", pa.string()), ("device", pa.string()),
    ("retimed", pa.int16()),  # times the request was timed again after a disturbance (profile.StallGuard)
])
OPTIONAL = {"latency_source": None, "retimed": 0}  # columns that profiles of older versions lack
# A row over FENCE x its configuration's median was timed while something else held the machine
# (the stall guard re-times such rows; older profiles kept them): latency quantiles leave it out.
FENCE = 3.0
KEY = ["dataset", "split", "sample_id", *KNOB_COLUMNS]


def part_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
    return []


def read_profile(path: str | Path, required: bool = True) -> pd.DataFrame:
    files = part_files(path)
    if not files:
        if required:
            raise UserError(f"no profile records at {path}: run python -m lvlm_ctrl.profile profile.path={path} first")
        return pd.DataFrame(columns=SCHEMA.names)
    try:
        frames = [pq.read_table(f).to_pandas() for f in files]
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"malformed profile part under {path}: {err}; delete the broken file and rerun") from None
    df = pd.concat(frames, ignore_index=True)
    missing = set(SCHEMA.names) - set(df.columns) - set(OPTIONAL)
    if missing:
        raise UserError(f"profile at {path} lacks columns {sorted(missing)}; it was not written by lvlm_ctrl.profile")
    df = with_optional_columns(df)
    if df.empty and required:
        raise UserError(f"the profile at {path} is empty: profile at least one sample")
    # a merge killed before it removed its parts leaves each record twice; the latest copy wins
    return df.drop_duplicates(KEY, keep="last", ignore_index=True)


def with_optional_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The columns older profiles lack, at their default."""
    missing = {c: v for c, v in OPTIONAL.items() if c not in df}
    return df.assign(**missing) if missing else df


def robust_quantile(latencies, q: float) -> float:
    """The q-quantile of one configuration's latencies without the rows over FENCE x their median."""
    x = np.asarray(latencies, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan")
    return float(np.quantile(x[x <= FENCE * np.median(x)], q))


def stored_rows(path: str | Path) -> int:
    """Rows as written on disk, before read_profile drops duplicate keys: what resume must keep exact."""
    return sum(pq.read_metadata(f).num_rows for f in part_files(path))


def write_part(directory: Path, name: str, records: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    final = directory / name
    tmp = directory / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def merge(path: str | Path, out: str | Path) -> pd.DataFrame:
    """All parts (shards included) into one Parquet file, one row per key; the merged parts go."""
    parts = part_files(path)
    df = read_profile(path).sort_values(KEY).reset_index(drop=True)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), tmp)
    os.replace(tmp, out)
    for part in parts:
        if part.resolve() != out.resolve():
            part.unlink()
    return df
