"""Offline profiling: every configuration on every sample of a split (DESIGN.md's core experiment).

    python -m lvlm_ctrl.profile data.split=val data.limit=300 profile.path=outputs/profiles/val300
    python -m lvlm_ctrl.profile ... profile.shard=0 profile.num_shards=2      # one process per shard
    python -m lvlm_ctrl.profile merge=true profile.path=...                   # shards -> profile.parquet

Each work unit is one configuration on a chunk of samples, written as one Parquet part; a rerun with
the same profile.path skips every (sample, configuration) already recorded, and a second process on
the same path and shard waits for the first instead of repeating its work. With `latency=measured`,
each request is timed alone at batch size 1 after warm-up and its answer is that run's answer; a
request a disturbance slowed is timed again (StallGuard). With `latency=predicted`, a chunk's answers at
every configuration come from the rollout engine (backbone/rollout.py: the vision encoder and the
blocks before p run once for all the configurations that share them) and the latency model fills in
the times (fast; for the GRPO environment's answers and yardsticks such as the oracle).
"""

from __future__ import annotations

import random
import statistics
import time
from collections import deque
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from lvlm_ctrl.backbone.rollout import RolloutEngine
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import exclusive
from lvlm_ctrl.metrics import vqa_score
from lvlm_ctrl.profiling import KNOB_COLUMNS, merge, read_profile, write_part


def record(dataset, sample, knobs, gen, row: int, backbone, source: str, retimed: int = 0) -> dict:
    return {
        "dataset": dataset.name, "split": dataset.split, "sample_id": sample.sample_id, **knobs.as_dict(),
        "vision_tokens": int(gen.vision_tokens[row]), "text_tokens": int(gen.text_tokens[row]),
        "output_tokens": int(gen.output_tokens[row]), "prediction": gen.answers[row],
        "accuracy": vqa_score(gen.answers[row], list(sample.answers)),
        "T_vision_ms": gen.vision_ms, "T_prefill_ms": gen.prefill_ms, "T_decode_ms": gen.decode_ms,
        "T_total_ms": gen.total_ms, "latency_source": source, "backbone": backbone.name, "device": str(backbone.device),
        "retimed": retimed,
    }


class StallGuard:
    """Times requests as a benchmark harness does: a request over request_factor x its unit's median
    (same configuration, neighbouring samples) is timed again, and so is a whole unit after which a
    canary (the cheapest configuration on one sample, best of two) runs over factor x its usual time,
    once the machine is back to its usual speed (waiting at most max_wait_s in all). Drift of 20-30%
    and ordinary jitter are the machine's real speed and stay in the profile (the lookup's q95 needs
    that tail); another process taking the cores for a while is not."""

    def __init__(self, backbone, image, question: str, factor: float = 1.5, request_factor: float = 3.0,
                 retries: int = 3, max_wait_s: float = 300.0):
        self.backbone, self.image, self.question = backbone, image, question
        self.factor, self.request_factor = factor, request_factor
        self.retries, self.max_wait_s = retries, max_wait_s
        self.canaries: deque[float] = deque(maxlen=64)
        self.waited_s = 0.0

    def canary_ms(self) -> float:
        knobs = self.backbone.space.cheapest()
        return min(self.backbone.generate([self.image], [self.question], knobs).total_ms for _ in range(2))

    def steady(self) -> bool:
        """Whether the machine ran at its usual speed; if not, wait until it does (or max_wait_s)."""
        t = self.canary_ms()
        usual = statistics.median(self.canaries) if len(self.canaries) >= 3 else None
        if usual is None or t <= self.factor * usual:
            self.canaries.append(t)
            return True
        start = time.perf_counter()
        deadline = start + max(0.0, self.max_wait_s - self.waited_s)
        while time.perf_counter() < deadline and self.canary_ms() > self.factor * usual:
            time.sleep(0.5)
        self.waited_s += time.perf_counter() - start
        return False

    def measure(self, run, n: int) -> tuple[list, list[int]]:
        """run(i) -> Generation of request i; -> each request's final Generation and re-timing count."""
        gens = [run(i) for i in range(n)]
        retimed = [0] * n
        for _ in range(self.retries):
            med = statistics.median(g.total_ms for g in gens)
            slow = [i for i, g in enumerate(gens) if g.total_ms > self.request_factor * med]
            if not self.steady():
                slow = list(range(n))
            if not slow:
                break
            for i in slow:
                gens[i] = run(i)
                retimed[i] += 1
        return gens, retimed


def profile_unit(backbone, dataset, knobs, chunk, images, source: str, latency_model=None,
                 guard: StallGuard | None = None, answered: dict | None = None) -> list[dict]:
    """One configuration on a chunk of samples: timed at batch 1 (`measured`), or with the rollout
    engine's answers for the chunk (`answered`: {(sample id, knobs): (Generation, row)}) and the
    latency model's times (`predicted`)."""
    if source == "measured":
        def run(i):
            return backbone.generate([images[i]], [chunk[i].question], knobs)

        gens, retimed = guard.measure(run, len(chunk)) if guard else ([run(i) for i in range(len(chunk))],
                                                                      [0] * len(chunk))
        return [record(dataset, s, knobs, g, 0, backbone, source, r) for s, g, r in zip(chunk, gens, retimed)]
    rows = [record(dataset, s, knobs, *answered[(s.sample_id, knobs)], backbone, source) for s in chunk]
    for r in rows:
        r.update(latency_model.predict_record(r))
    return rows


def engine_answers(engine: RolloutEngine, sweep, images: dict) -> dict:
    """The rollout engine's answers for one chunk's sweep of (configuration index, knobs, samples):
    {(sample id, knobs): (Generation, row)}."""
    samples = list(dict.fromkeys(s for _, _, chunk in sweep for s in chunk))
    configs = {s.sample_id: [] for s in samples}
    for _, knobs, chunk in sweep:
        for s in chunk:
            configs[s.sample_id].append(knobs)
    out = engine.run([images[s.sample_id] for s in samples], [s.question for s in samples],
                     [configs[s.sample_id] for s in samples])
    return {(samples[i].sample_id, knobs): v for (i, knobs), v in out.items()}


def profile_split(backbone, dataset, path, source: str = "measured", latency_model=None, batch_size: int = 32,
                  warmup: int = 3, shard: int = 0, num_shards: int = 1, desc: str = "profile") -> int:
    """Profile every configuration on the samples of `dataset` (this shard's) into `path`; returns
    how many records this call wrote. Resumes what is there."""
    if not 0 <= shard < num_shards:
        raise UserError(f"profile.shard must be in [0, {num_shards}), got {shard}")
    if source == "predicted" and latency_model is None:
        raise UserError("latency=predicted needs a latency model (latency.model=PATH)")
    path = Path(path)
    with exclusive(path / f".shard{shard}.lock", f"profiling shard {shard} of {path}"):
        return _profile_locked(backbone, dataset, path, source, latency_model, int(batch_size), int(warmup),
                               shard, num_shards, desc)


def _profile_locked(backbone, dataset, path, source, latency_model, chunk_size, warmup, shard, num_shards, desc):
    samples = dataset.samples[shard::num_shards]
    done_df = read_profile(path, required=False)
    if len(done_df) and set(done_df["backbone"]) != {backbone.name}:
        raise UserError(f"{path} holds a profile of backbone {sorted(set(done_df['backbone']))}, not "
                        f"{backbone.name!r}: pass another profile.path")
    done = set(map(tuple, done_df[["sample_id", *KNOB_COLUMNS]].astype(str).values)) if len(done_df) else set()
    configs = backbone.space.configurations()
    # Sweep all configurations (shuffled) over one chunk of samples before the next chunk: each
    # configuration's requests are spread over the whole run, so the machine's speed drifting over
    # minutes shifts every configuration alike instead of biasing whichever ran in a slow spell.
    keys = [tuple(str(v) for v in knobs.as_dict().values()) for knobs in configs]
    sweeps = []
    for start in range(0, len(samples), chunk_size):
        sweep = []
        for ci, (knobs, key) in enumerate(zip(configs, keys)):
            pending = [s for s in samples[start:start + chunk_size] if (s.sample_id, *key) not in done]
            if pending:
                sweep.append((ci, knobs, pending))
        random.Random(start).shuffle(sweep)
        if sweep:
            sweeps.append(sweep)
    todo = [unit for sweep in sweeps for unit in sweep]
    total = len(samples) * len(configs)
    remaining = sum(len(c) for _, _, c in todo)
    print(f"{desc}: {total - remaining} of {total} records already in {path}; {len(todo)} units to run", flush=True)
    if not todo:
        return 0
    images = {s.sample_id: s.load_image() for s in samples}
    if warmup and source == "measured":  # every configuration once, untimed: first runs of a shape pay extra
        first = samples[0]
        for knobs in configs:
            backbone.generate([images[first.sample_id]], [first.question], knobs)
    for s in samples[:warmup]:
        for knobs in (backbone.space.full(), backbone.space.cheapest()):
            backbone.generate([images[s.sample_id]], [s.question], knobs)
    guard = StallGuard(backbone, images[samples[0].sample_id], samples[0].question) if source == "measured" else None
    engine = RolloutEngine(backbone, batch_size=chunk_size) if source == "predicted" else None
    seq = int(time.time() * 1000)
    retimed, n = 0, 0
    with tqdm(total=remaining, desc=desc, unit="req", dynamic_ncols=True) as bar:
        for sweep in sweeps:
            # predicted latency: the chunk's answers at every pending configuration in one engine run
            answered = engine_answers(engine, sweep, images) if engine else None
            for ci, knobs, chunk in sweep:
                rows = profile_unit(backbone, dataset, knobs, chunk, [images[s.sample_id] for s in chunk], source,
                                    latency_model, guard, answered)
                write_part(path / f"shard{shard}", f"part-{seq}-{n:06d}-c{ci:03d}.parquet", rows)
                n += 1
                retimed += sum(r["retimed"] > 0 for r in rows)
                bar.update(len(chunk))
                if guard:
                    bar.set_postfix(retimed=retimed, refresh=False)
    if guard:
        print(f"{desc}: {retimed} of {remaining} requests timed again after a disturbance "
              f"(waited {guard.waited_s:.0f} s for the machine)", flush=True)
    return remaining


@hydra.main(version_base="1.3", config_path="../conf", config_name="profile")
@cli
def main(cfg: DictConfig) -> None:
    path = Path(cfg.profile.path)
    if cfg.merge:
        df = merge(path, path / "profile.parquet" if path.is_dir() else path)
        print(f"merged {len(df)} records into {path / 'profile.parquet'}")
        return
    latency_model = None
    if cfg.latency.source == "predicted":
        from lvlm_ctrl.latency_model import LatencyModel

        latency_model = LatencyModel.load(cfg.latency.model)
    backbone = hydra.utils.instantiate(cfg.model)
    dataset = hydra.utils.instantiate(cfg.data)
    profile_split(backbone, dataset, path, cfg.latency.source, latency_model, cfg.profile.batch_size,
                  cfg.profile.warmup, int(cfg.profile.shard), int(cfg.profile.num_shards))
    print(f"profile complete: {len(read_profile(path))} records under {path}")


if __name__ == "__main__":
    main()
