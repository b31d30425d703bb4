"""Evaluate a controller on a split over a grid of budgets; writes eval_summary.json.

    python -m lvlm_ctrl.evaluate controller=static data.split=test data.limit=2000
    python -m lvlm_ctrl.evaluate controller=static controller.tier=low controller.insertion=1 \\
        controller.top_k=4 controller.num_blocks=12
    python -m lvlm_ctrl.evaluate controller=lookup controller.table=.../lookup_table.json
    python -m lvlm_ctrl.evaluate controller=oracle profile.path=outputs/profiles/easy_vqa-test-1000

Latency is wall time at batch size 1, after warm-up, from preprocessing at the chosen tier to the
last generated token, plus the controller's own decision time.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, defaultdict

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from lvlm_ctrl.controllers import serving_controller
from lvlm_ctrl.controllers.lookup import check_budget
from lvlm_ctrl.controllers.static import StaticController
from lvlm_ctrl.data import question_family
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import atomic_write_json, check_writable, command, machine
from lvlm_ctrl.metrics import vqa_score
from lvlm_ctrl.plots import accuracy_vs_budget, load_summaries


def parse_budgets(values) -> list[float | None]:
    """eval.budgets_ms -> floats, with a clear error for <= 0, NaN or non-numbers; None = no budget."""
    if values is None:
        return [None]
    if isinstance(values, (int, float, str)):
        values = [values]
    if len(values) == 0:
        raise UserError("eval.budgets_ms is empty: give budgets in ms, e.g. 'eval.budgets_ms=[20,40]', or null for "
                        "eval.num_budgets over the controller's feasible range")
    return [check_budget(v) for v in values]


def serve(backbone, controller, sample, image, budget_ms):
    """One request through a controller: (Generation, knobs, controller overhead in ms). A controller
    that calibrates its latency (lookup, grpo) observes the request's measured latency afterwards."""
    if hasattr(controller, "serve"):  # two-stage controllers decide inside the serving pass
        gen, overhead = controller.serve(backbone, sample.question, image, budget_ms)
        knobs = gen.knobs
    else:
        t0 = time.perf_counter()
        knobs = controller.decide(sample, budget_ms)
        overhead = (time.perf_counter() - t0) * 1e3
        gen = backbone.generate([image], [sample.question], knobs)
    if budget_ms is not None and hasattr(controller, "observe"):
        controller.observe(knobs, gen.total_ms + overhead, budget_ms)
    return gen, knobs, overhead


def warm_up(backbone, controller, samples, budget, n: int = 3, image=None) -> None:
    """Untimed requests first (a fresh process pays for lazy initialisation), then, when the controller
    calibrates, a few configurations timed to start its calibration from this machine's state."""
    images = [image] * len(samples) if image is not None else [s.load_image() for s in samples[:max(n, 1)]]
    calibration = getattr(controller, "calibration", None)
    if calibration is not None:
        controller.calibration = None  # lazy initialisation is not this machine's speed
    overheads = [serve(backbone, controller, s, img, budget)[2] for s, img in zip(samples[:n], images)]
    if calibration is not None and samples:
        controller.calibration = calibration
        # inputs may differ in cost, and a request on an input just served runs faster than one on a
        # new input (as each sample's first request is served): take turns over up to 64 inputs
        requests = itertools.cycle(samples[:64])

        def run(knobs):
            s = next(requests)
            return served_at(backbone, controller, knobs, s.question, image if image is not None else s.load_image())
        calibration.warm_up(run, controller.profiled_configurations(), float(np.median(overheads or [0.0])))


def served_at(backbone, controller, knobs, question: str, image) -> float:
    """One request at fixed knobs, timed as the controller serves it (a two-stage controller decides
    stage 2 inside the prefill, which costs beside the decision): its latency in ms."""
    decide = (lambda _token, _prompt: (knobs.top_k, knobs.num_blocks)) if hasattr(controller, "serve") else None
    return backbone.generate([image], [question], knobs, decide=decide).total_ms


def serving_grid(budgets: list[float], floor_ms: float | None) -> list[float]:
    """The default budget grid on this machine now: a machine slower than its profile cannot keep the
    profile's lowest budgets, whatever the controller decides, so the grid is scaled by how much
    slower the cheapest configuration runs now (its 97.5th percentile at warm-up) than profiled."""
    if floor_ms is None or floor_ms <= budgets[0]:
        return budgets
    return [float(b * floor_ms / budgets[0]) for b in budgets]


def run_requests(backbone, controllers: dict, samples, budgets: list, probe=None) -> tuple[dict, list]:
    """Serve every sample at every budget with every controller ({name: controller}), one request at
    a time: (records[name][budget], the probe's timings).

    Turns are interleaved per sample, so a slow spell of the machine hits every budget and every
    controller alike instead of inflating the violation rate of whichever ran during it, and their
    order rotates from one sample to the next: a sample's first request is the slowest (a new image
    and question, after the previous sample's last request), which no single turn should always pay.
    `probe(sample, image) -> ms`, if given, runs once per sample in a rotating turn of its own.
    """
    turns = [(name, b) for name in controllers for b in budgets] + ([("probe", None)] if probe is not None else [])
    records, probes = {name: {b: [] for b in budgets} for name in controllers}, []
    names = "+".join(c.name for c in controllers.values())
    with tqdm(total=len(samples) * len(turns), desc=f"evaluate {names}", unit="req", dynamic_ncols=True) as bar:
        for i, s in enumerate(samples):
            image = s.load_image()
            for name, b in turns[i % len(turns):] + turns[:i % len(turns)]:
                if name == "probe":
                    probes.append(probe(s, image))
                    continue
                gen, knobs, overhead = serve(backbone, controllers[name], s, image, b)
                records[name][b].append({
                    "sample_id": s.sample_id, "prediction": gen.answers[0],
                    "accuracy": vqa_score(gen.answers[0], list(s.answers)), "knobs": knobs.as_dict(),
                    "overhead_ms": overhead, "T_vision_ms": gen.vision_ms, "T_prefill_ms": gen.prefill_ms,
                    "T_decode_ms": gen.decode_ms, "latency_ms": gen.total_ms + overhead,
                })
            bar.update(len(turns))
    return records, probes


def floor_probe(backbone, controller):
    """The cheapest profiled configuration, served as the controller serves (the GRPO controller
    decides stage 2 inside the prefill): during an evaluation it measures the lowest latency this
    machine can keep, minute by minute, where the warm-up's floor saw a few seconds. A budget below
    its 95th percentile cannot be kept by any controller (issue 15's drift criterion)."""
    knobs = min(controller.profiled_configurations(), key=lambda c: c[1])[0]
    return lambda s, image: served_at(backbone, controller, knobs, s.question, image)


def keepable(results: list[dict], probes: list[float], overhead_ms: float) -> dict:
    """Marks each budget's result with whether the machine could keep it during the evaluation."""
    floor = float(np.percentile(probes, 95)) + overhead_ms
    for r in results:
        r["keepable"] = r["budget_ms"] is None or r["budget_ms"] >= floor
    return {"p95_ms": floor, "requests": len(probes)}


def summarize(records: list[dict], budget_ms: float | None) -> dict:
    lat = np.array([r["latency_ms"] for r in records])
    knobs = {name: dict(Counter(str(r["knobs"][name]) for r in records)) for name in records[0]["knobs"]}
    families = defaultdict(list)  # question families a sample id names (synth_vqa); none elsewhere
    for r in records:
        families[question_family(r["sample_id"])].append(r["accuracy"])
    return {
        "budget_ms": budget_ms,
        "accuracy": float(np.mean([r["accuracy"] for r in records])),
        "accuracy_by_family": {f: float(np.mean(a)) for f, a in sorted(families.items()) if f != "any"},
        "violation_rate": float(np.mean(lat > budget_ms)) if budget_ms else None,
        "mean_latency_ms": float(lat.mean()),
        "median_latency_ms": float(np.median(lat)),
        "p5_latency_ms": float(np.percentile(lat, 5)),
        "p95_latency_ms": float(np.percentile(lat, 95)),
        "mean_latency_over_budget": float((lat / budget_ms).mean()) if budget_ms else None,
        "p95_latency_over_budget": float(np.percentile(lat / budget_ms, 95)) if budget_ms else None,
        "controller_overhead_ms": float(np.median([r["overhead_ms"] for r in records])),
        "stage_ms": {k: float(np.mean([r[k] for r in records])) for k in ("T_vision_ms", "T_prefill_ms", "T_decode_ms")},
        "knobs": knobs,
    }


def auc(results: list[dict]) -> float | None:
    """Area under accuracy vs budget, normalised by the budget range (so it is a mean accuracy)."""
    pts = sorted((r["budget_ms"], r["accuracy"]) for r in results if r["budget_ms"] is not None)
    if len(pts) < 2 or pts[0][0] == pts[-1][0]:
        return None
    xs, ys = zip(*pts)
    return float(np.trapezoid(ys, xs) / (xs[-1] - xs[0]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@cli
def main(cfg: DictConfig) -> float | None:
    budgets = parse_budgets(cfg.eval.budgets_ms)
    num_budgets = cfg.eval.num_budgets
    if isinstance(num_budgets, bool) or not isinstance(num_budgets, int) or num_budgets < 1:
        raise UserError(f"eval.num_budgets={num_budgets!r}: give a whole number of budgets >= 1")
    compare = load_summaries(cfg.eval.compare)
    out = check_writable(cfg.eval.output_dir) / "eval_summary.json"
    backbone = hydra.utils.instantiate(cfg.model)
    controller = serving_controller(cfg, backbone)
    dataset = hydra.utils.instantiate(cfg.data)
    default_grid = budgets == [None] and hasattr(controller, "default_budgets")
    if default_grid:
        budgets = controller.default_budgets(num_budgets)
    warm_up(backbone, controller, dataset.samples, budgets[-1], cfg.eval.warmup)
    calibration = getattr(controller, "calibration", None)
    if default_grid and calibration is not None:
        budgets = serving_grid(budgets, calibration.floor_ms)
    floor = None
    if isinstance(controller, StaticController):
        # its choice ignores the budget: serve once, score against every budget
        records = run_requests(backbone, {"static": controller}, dataset.samples, [None])[0]["static"][None]
        results = [summarize(records, b) for b in budgets]
    else:
        probe = floor_probe(backbone, controller) if cfg.eval.floor_probe and calibration is not None else None
        records, probes = run_requests(backbone, {"main": controller}, dataset.samples, budgets, probe)
        results = [summarize(records["main"][b], b) for b in budgets]
        if probe is not None:
            overhead = float(np.median([r["controller_overhead_ms"] for r in results]))
            floor = keepable(results, probes, overhead)
    summary = {
        "controller": controller.name, "dataset": dataset.name, "split": dataset.split,
        "num_samples": len(dataset), "latency_source": cfg.latency.source, "backbone": backbone.name,
        "calibration": calibration.state() if calibration is not None else None, "floor": floor,
        "results": results, "auc": auc(results), "command": command("lvlm_ctrl.evaluate"), "machine": machine(),
    }
    atomic_write_json(out, summary)
    if summary["auc"] is not None:
        accuracy_vs_budget([summary, *compare], out.with_name("accuracy_vs_budget.png"))
    print(f"{'budget ms':>10} {'accuracy':>9} {'late':>6} {'median ms':>10} {'p95 ms':>8}")
    for r in results:
        budget = "-" if r["budget_ms"] is None else f"{r['budget_ms']:.1f}"
        late = "-" if r["violation_rate"] is None else f"{r['violation_rate']:.1%}"
        late += "" if r.get("keepable", True) else "*"
        print(f"{budget:>10} {r['accuracy']:>9.4f} {late:>6} {r['median_latency_ms']:>10.1f} "
              f"{r['p95_latency_ms']:>8.1f}")
    if floor is not None and not all(r["keepable"] for r in results):
        print(f"* below the cheapest configuration's p95 during this evaluation ({floor['p95_ms']:.1f} ms): "
              "no controller could keep it on this machine now")
    if results[-1]["accuracy_by_family"]:
        print("by question family at", "-" if results[-1]["budget_ms"] is None else f"{results[-1]['budget_ms']:.1f} ms:",
              " ".join(f"{f} {a:.3f}" for f, a in results[-1]["accuracy_by_family"].items()))
    if summary["auc"] is not None:
        print(f"AUC {summary['auc']:.4f}")
    print(f"wrote {out}")
    return summary["auc"] if summary["auc"] is not None else results[0]["accuracy"]


if __name__ == "__main__":
    main()
