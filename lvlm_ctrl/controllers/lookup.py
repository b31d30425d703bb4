"""The lookup-table controller: per configuration, aggregate accuracy and latency from the profile;
for a budget, the most accurate configuration whose latency fits, else the closest in latency.

    table = LookupTable.load("lookup_table.json")
    table.predict(latency_budget=80.0)                       # tier, insertion, top_k, num_active_blocks, ...
    table.predict(80.0, return_all_candidates=True)          # every configuration that fits, best first
    table.predict_stage1(80.0), table.predict_stage2(80.0)   # the seed's split interface

Aggregation (the seed's): `mean`; `median` (latency median; accuracy stays the mean, since the
median of 0/1 scores says nothing); `max_accuracy` (the best sample's accuracy and that sample's
latency: optimistic). Beyond the seed: `latency_quantile` (e.g. 0.9: a configuration fits when 90%
of its requests did, which keeps violations near 10%), per-dataset tables, tables per input group
(`group_by`: the image's size class, the question's family or both: with both and the val profile
it is the structured oracle of the yardsticks), incremental `update`,
validation on load, O(log n) queries by bisection over latency with a prefix argmax.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from lvlm_ctrl.data import input_group
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import atomic_write_json
from lvlm_ctrl.knobs import Knobs
from lvlm_ctrl.profiling import KNOB_COLUMNS, robust_quantile

AGGREGATIONS = ("mean", "median", "max_accuracy")
ALL = "all"
GROUP = "group:"  # tables per input group are named GROUP + the group
ENTRY_KEYS = {"tier", "insertion", "top_k", "num_active_blocks", "accuracy", "latency", "num_samples",
              "accuracy_std", "latency_std"}


def check_budget(budget) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise UserError(f"latency budget {budget!r} is not a number: give milliseconds, e.g. 80") from None
    if math.isnan(b) or math.isinf(b) or b <= 0:
        raise UserError(f"latency budget {budget!r} must be a positive, finite number of milliseconds")
    return b


def aggregate(key: tuple, group: pd.DataFrame, aggregation: str, latency_quantile: float | None) -> dict:
    acc, lat = group["accuracy"].to_numpy(float), group["T_total_ms"].to_numpy(float)
    if aggregation == "max_accuracy":
        best = int(np.argmax(acc))
        accuracy, latency = float(acc[best]), float(lat[best])
    else:
        accuracy = float(acc.mean())
        latency = float(np.median(lat) if aggregation == "median" else lat.mean())
    median = float(np.median(lat))
    if latency_quantile is not None:
        latency = robust_quantile(lat, latency_quantile)
    tier, p, k, n = key
    return {"tier": tier, "insertion": int(p), "top_k": int(k), "num_active_blocks": int(n), "accuracy": accuracy,
            "latency": latency, "num_samples": len(group), "accuracy_std": float(acc.std()),
            "latency_std": float(lat.std()), "latency_median": median}


class LookupTable:
    def __init__(self, tables: dict[str, list[dict]], options: dict, records: list[dict] | None = None):
        if (aggregation := options.get("aggregation")) and aggregation not in AGGREGATIONS:
            raise UserError(f"unknown aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
        self.tables, self.options, self.records = tables, dict(options), records or []
        self.tolerance = float(options.get("tolerance", 0.0))
        self._index = {name: self._build_index(entries) for name, entries in tables.items()}

    # ---- building ----------------------------------------------------------------------
    @classmethod
    def build(cls, df: pd.DataFrame, aggregation: str = "mean", tolerance: float = 0.0,
              latency_quantile: float | None = None, datasets: list[str] | None = None,
              group_by: str | None = None, groups: dict[str, str] | None = None) -> LookupTable:
        """groups: sample id -> its input group (data.input_group by `group_by`): one table per group
        beside the pooled one, for a controller that tells the groups apart before deciding."""
        if df.empty:
            raise UserError("cannot build a lookup table from an empty profile")
        if datasets:
            unknown = set(datasets) - set(df["dataset"])
            if unknown:
                raise UserError(f"datasets {sorted(unknown)} are not in the profile (it has {sorted(set(df['dataset']))})")
            df = df[df["dataset"].isin(datasets)]
        options = {"aggregation": aggregation, "tolerance": tolerance, "latency_quantile": latency_quantile,
                   "group_by": group_by}
        cols = ["dataset", "sample_id", *KNOB_COLUMNS, "accuracy", "T_total_ms"]
        if group_by:
            missing = set(df["sample_id"]) - set(groups or {})
            if missing:
                raise UserError(f"group_by={group_by}: no input group for {len(missing)} profiled samples (e.g. "
                                f"{sorted(missing)[0]}); build the table with the profile's own dataset")
            df = df.assign(group=df["sample_id"].map(groups))
            cols.append("group")
        return cls._from_records(df[cols].to_dict("records"), options)

    @classmethod
    def _from_records(cls, records: list[dict], options: dict) -> LookupTable:
        if options.get("aggregation", "mean") not in AGGREGATIONS:
            raise UserError(f"unknown aggregation {options['aggregation']!r}: choose one of {', '.join(AGGREGATIONS)}")
        df = pd.DataFrame(records)
        q = options.get("latency_quantile")
        agg = lambda d: [aggregate(key, g, options.get("aggregation", "mean"), q)
                         for key, g in d.groupby(KNOB_COLUMNS) if not g.empty]
        tables = {ALL: agg(df)}
        if df["dataset"].nunique() > 1:
            tables.update({name: agg(g) for name, g in df.groupby("dataset")})
        if "group" in df:
            tables.update({GROUP + name: agg(g) for name, g in df.groupby("group")})
        return cls(tables, options, records)

    def update(self, df: pd.DataFrame) -> LookupTable:
        """A new table with `df`'s records added (a re-profiled sample replaces its old records)."""
        cols = ["dataset", "sample_id", *KNOB_COLUMNS, "accuracy", "T_total_ms"]
        if self.options.get("group_by"):
            raise UserError("update a grouped lookup table by building it again from the whole profile")
        merged = pd.concat([pd.DataFrame(self.records), df[cols]], ignore_index=True)
        merged = merged.drop_duplicates(["dataset", "sample_id", *KNOB_COLUMNS], keep="last")
        return self._from_records(merged.to_dict("records"), self.options)

    @staticmethod
    def _build_index(entries: list[dict]):
        order = sorted(entries, key=lambda e: (e["latency"], -e["accuracy"]))
        lats = [e["latency"] for e in order]
        best, best_at = [], None
        for i, e in enumerate(order):
            if best_at is None or e["accuracy"] > order[best_at]["accuracy"]:
                best_at = i
            best.append(best_at)
        return order, lats, best

    # ---- queries -----------------------------------------------------------------------
    def _table(self, dataset: str | None, group: str | None = None):
        if group is not None and GROUP + group in self._index:
            return self._index[GROUP + group]
        name = dataset or ALL  # also for a group the profile never saw: the pooled table
        if name not in self._index:
            # a single-dataset table answers for that dataset under its own name too
            names = {r.get("dataset") for r in self.records}
            if names == {name}:
                name = ALL
            else:
                raise UserError(f"no lookup table for dataset {dataset!r}: have {sorted(self._index)}")
        return self._index[name]

    def predict(self, latency_budget, return_all_candidates: bool = False, dataset: str | None = None,
                group: str | None = None):
        budget = check_budget(latency_budget)
        order, lats, best = self._table(dataset, group)
        limit = budget * (1 + self.tolerance)
        fit = bisect.bisect_right(lats, limit)
        if return_all_candidates:
            return sorted(order[:fit], key=lambda e: (-e["accuracy"], e["latency"]))
        choice = order[best[fit - 1]] if fit else order[0]  # nothing fits: the fastest is the closest
        return {**choice, "within_budget": bool(fit)}

    def predict_all(self, latency_budget, dataset: str | None = None) -> dict:
        return self.predict(latency_budget, dataset=dataset)

    def predict_stage1(self, latency_budget, dataset: str | None = None) -> dict:
        c = self.predict(latency_budget, dataset=dataset)
        return {"tier": c["tier"], "insertion": c["insertion"]}

    def predict_stage2(self, latency_budget, dataset: str | None = None) -> dict:
        c = self.predict(latency_budget, dataset=dataset)
        return {"top_k": c["top_k"], "num_active_blocks": c["num_active_blocks"]}

    def get_statistics(self, dataset: str | None = None) -> dict:
        order, _, _ = self._table(dataset)
        lat = [e["latency"] for e in order]
        acc = [e["accuracy"] for e in order]
        return {"num_configurations": len(order), "latency_range": [min(lat), max(lat)],
                "accuracy_range": [min(acc), max(acc)], "mean_accuracy": float(np.mean(acc)),
                "num_samples": int(sum(e["num_samples"] for e in order)), "tables": sorted(self.tables),
                **self.options}

    def feasible_range(self, dataset: str | None = None) -> tuple[float, float]:
        return tuple(self.get_statistics(dataset)["latency_range"])

    # ---- files -------------------------------------------------------------------------
    def save(self, path) -> Path:
        return atomic_write_json(path, {"format": "lvlm_ctrl.lookup_table/1", "options": self.options,
                                        "tables": self.tables, "records": self.records})

    @classmethod
    def load(cls, path, space=None) -> LookupTable:
        path = Path(str(path))
        if not path.exists():
            raise UserError(f"lookup table not found at {path}: build one with "
                            "python -m lvlm_ctrl.train controller=lookup profile.path=...")
        try:
            data = json.loads(path.read_text())
            tables, options = data["tables"], data["options"]
            if not isinstance(tables, dict) or not tables or not all(tables.values()):
                raise ValueError("no configurations in it")
            for entries in tables.values():
                for e in entries:
                    missing = ENTRY_KEYS - set(e)
                    if missing:
                        raise ValueError(f"an entry lacks {sorted(missing)}")
                    if not all(math.isfinite(float(e[k])) for k in ("accuracy", "latency")):
                        raise ValueError("an entry has a non-finite accuracy or latency")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"malformed lookup table {path}: {err}; rebuild it with "
                            "python -m lvlm_ctrl.train controller=lookup") from None
        table = cls(tables, options, data.get("records"))
        if space is not None:
            table.validate(space, path)
        return table

    def validate(self, space, path="table") -> None:
        """Every knob value inside the backbone's space; report coverage."""
        for entries in self.tables.values():
            for e in entries:
                try:
                    space.validate(Knobs(e["tier"], int(e["insertion"]), int(e["top_k"]), int(e["num_active_blocks"])))
                except UserError as err:
                    raise UserError(f"lookup table {path} does not match this backbone: {err}") from None
        self.coverage = len(self.tables[ALL]) / len(space.configurations())


class LookupController:
    name = "lookup"

    def __init__(self, table: str | None = None, dataset: str | None = None, build: dict | None = None):
        self.table_path, self.dataset, self.build_options = table, dataset, dict(build or {})
        self.table: LookupTable | None = None
        self.calibration = None  # evaluate / infer set it (calibration.py)
        self.groups: dict[str, str | None] = {}  # sample id -> input group, as requests come

    def fit(self, profile_df: pd.DataFrame, samples=()) -> LookupTable:
        """samples: the profiled VQASamples (their ids and image sizes give the input groups)."""
        by = self.build_options.get("group_by")
        groups = {s.sample_id: input_group(s.sample_id, s.image_size(), by) for s in samples} if by else None
        self.table = LookupTable.build(profile_df, **self.build_options, groups=groups)
        return self.table

    def bind(self, backbone) -> LookupController:
        if self.table is None:
            if not self.table_path:
                raise UserError("controller=lookup needs controller.table=PATH (a lookup_table.json)")
            self.table = LookupTable.load(self.table_path, backbone.space)
        else:
            self.table.validate(backbone.space)
        order, _, _ = self.table._table(self.dataset)
        # the profile's median per configuration: what calibration compares measured requests with
        self.medians = {(e["tier"], e["insertion"], e["top_k"], e["num_active_blocks"]):
                        e.get("latency_median", e["latency"]) for e in order}
        return self

    def default_budgets(self, n: int) -> list[float]:
        lo, hi = self.table.feasible_range(self.dataset)
        return [float(b) for b in np.linspace(lo, hi, n)]

    def profiled_latency(self, knobs: Knobs) -> float:
        return float(self.medians.get((knobs.tier, knobs.insertion, knobs.top_k, knobs.num_blocks), math.nan))

    def profiled_configurations(self) -> list[tuple[Knobs, float]]:
        return [(Knobs(*key), m) for key, m in self.medians.items()]

    def profiled_range(self) -> tuple[float, float]:
        return min(self.medians.values()), max(self.medians.values())

    def decide(self, sample, budget_ms) -> Knobs:
        budget = self.calibration.profiled_budget(budget_ms) if self.calibration is not None else budget_ms
        group = None
        if by := self.table.options.get("group_by"):
            group = self.groups.get(sample.sample_id)
            if group is None:
                group = self.groups[sample.sample_id] = input_group(sample.sample_id, sample.image_size(), by)
        c = self.table.predict(budget, dataset=self.dataset, group=group)
        self.fits = c["within_budget"]
        return Knobs(c["tier"], c["insertion"], c["top_k"], c["num_active_blocks"])

    def observe(self, knobs: Knobs, latency_ms: float, budget_ms: float) -> None:
        """Calibration's feedback after a served request (evaluate.serve calls it)."""
        if self.calibration is not None:
            self.calibration.observe(self.profiled_latency(knobs), latency_ms, budget_ms, predicted_to_fit=self.fits)


@cli
def main(argv: list[str] | None = None) -> None:
    """Query a table for a list of budgets: python -m lvlm_ctrl.controllers.lookup TABLE 20 35 50."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lvlm_ctrl.controllers.lookup", description=main.__doc__)
    ap.add_argument("table")
    ap.add_argument("budgets_ms", nargs="+")
    ap.add_argument("--dataset", default=None, help="a per-dataset table by name (default: all pooled)")
    ap.add_argument("--candidates", action="store_true", help="every configuration that fits, best first")
    a = ap.parse_args(argv)
    table = LookupTable.load(a.table)
    budgets = [check_budget(b) for b in a.budgets_ms]  # all checked before anything is printed
    for b in budgets:
        if a.candidates:
            print(json.dumps({"budget_ms": b, "candidates": table.predict(b, True, a.dataset)}))
        else:
            print(json.dumps({"budget_ms": b, **table.predict(b, dataset=a.dataset)}))


if __name__ == "__main__":
    main()
