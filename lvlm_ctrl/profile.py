"""Offline profiling: every configuration on every sample of a split (DESIGN.md's core experiment).

    python -m lvlm_ctrl.profile data.split=val data.limit=300 profile.path=outputs/profiles/val300
    python -m lvlm_ctrl.profile ... profile.shard=0 profile.num_shards=2      # one process per shard
    python -m lvlm_ctrl.profile merge=true profile.path=...                   # shards -> profile.parquet

Each work unit is one configuration on a chunk of samples, written as one Parquet part; a rerun with
the same profile.path skips every (sample, configuration) already recorded. With
`latency=measured`, each request is timed alone at batch size 1 after warm-up and its answer is
that run's answer; with `latency=predicted`, answers come in batches and the latency model fills in
the times (fast; for yardsticks such as the oracle on a large split).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.metrics import vqa_score
from lvlm_ctrl.profiling import KNOB_COLUMNS, merge, read_profile, write_part


def record(dataset, sample, knobs, gen, row: int, backbone, source: str) -> dict:
    return {
        "dataset": dataset.name, "split": dataset.split, "sample_id": sample.sample_id, **knobs.as_dict(),
        "vision_tokens": gen.vision_tokens, "text_tokens": int(gen.text_tokens[row]),
        "output_tokens": int(gen.output_tokens[row]), "prediction": gen.answers[row],
        "accuracy": vqa_score(gen.answers[row], list(sample.answers)),
        "T_vision_ms": gen.vision_ms, "T_prefill_ms": gen.prefill_ms, "T_decode_ms": gen.decode_ms,
        "T_total_ms": gen.total_ms, "latency_source": source, "backbone": backbone.name, "device": str(backbone.device),
    }


def profile_unit(backbone, dataset, knobs, chunk, images, source: str, latency_model=None) -> list[dict]:
    if source == "measured":
        return [record(dataset, s, knobs, backbone.generate([img], [s.question], knobs), 0, backbone, source)
                for s, img in zip(chunk, images)]
    gen = backbone.generate(images, [s.question for s in chunk], knobs)
    rows = [record(dataset, s, knobs, gen, i, backbone, source) for i, s in enumerate(chunk)]
    for r in rows:
        r.update(latency_model.predict_record(r))
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="profile")
@cli
def main(cfg: DictConfig) -> None:
    path = Path(cfg.profile.path)
    if cfg.merge:
        df = merge(path, path / "profile.parquet" if path.is_dir() else path)
        print(f"merged {len(df)} records into {path / 'profile.parquet'}")
        return
    shard, num_shards = int(cfg.profile.shard), int(cfg.profile.num_shards)
    if not 0 <= shard < num_shards:
        raise UserError(f"profile.shard must be in [0, {num_shards}), got {shard}")
    source = cfg.latency.source
    latency_model = None
    if source == "predicted":
        from lvlm_ctrl.latency_model import LatencyModel

        latency_model = LatencyModel.load(cfg.latency.model)
    backbone = hydra.utils.instantiate(cfg.model)
    dataset = hydra.utils.instantiate(cfg.data)
    samples = dataset.samples[shard::num_shards]
    done_df = read_profile(path, required=False)
    done = set(map(tuple, done_df[["sample_id", *KNOB_COLUMNS]].astype(str).values)) if len(done_df) else set()
    configs = backbone.space.configurations()
    chunk_size = int(cfg.profile.batch_size)
    # Sweep all configurations (shuffled) over one chunk of samples before the next chunk: each
    # configuration's requests are spread over the whole run, so the machine's speed drifting over
    # minutes shifts every configuration alike instead of biasing whichever ran in a slow spell.
    keys = [tuple(str(v) for v in knobs.as_dict().values()) for knobs in configs]
    todo = []
    for start in range(0, len(samples), chunk_size):
        sweep = []
        for ci, (knobs, key) in enumerate(zip(configs, keys)):
            pending = [s for s in samples[start:start + chunk_size] if (s.sample_id, *key) not in done]
            if pending:
                sweep.append((ci, knobs, pending))
        random.Random(start).shuffle(sweep)
        todo.extend(sweep)
    total = len(samples) * len(configs)
    print(f"{total - sum(len(c) for _, _, c in todo)} of {total} records already in {path}; "
          f"{len(todo)} units to run")
    images = {s.sample_id: s.load_image() for s in samples}
    for s in samples[: cfg.profile.warmup]:
        for knobs in (backbone.space.full(), backbone.space.cheapest()):
            backbone.generate([images[s.sample_id]], [s.question], knobs)
    seq = int(time.time() * 1000)
    with tqdm(total=sum(len(c) for _, _, c in todo), desc="profile", unit="req", dynamic_ncols=True) as bar:
        for n, (ci, knobs, chunk) in enumerate(todo):
            rows = profile_unit(backbone, dataset, knobs, chunk, [images[s.sample_id] for s in chunk], source,
                                latency_model)
            write_part(path / f"shard{shard}", f"part-{seq}-{n:06d}-c{ci:03d}.parquet", rows)
            bar.update(len(chunk))
    print(f"profile complete: {len(read_profile(path))} records under {path}")


if __name__ == "__main__":
    main()
