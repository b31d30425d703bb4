"""The knob space's latency range on a GPU, for a model shaped like Qwen3-VL-30B-A3B (48 blocks, 128
experts, top-8, hidden 2048; vision 27 blocks, deepstack at 8/16/24) with random bf16 weights, built
on the device from transformers' own classes (no download). Times a spread of configurations at
batch 1 with CUDA events: vision, prefill, decode per token.

    python experiments/gpu_qwen3_vl_30b.py [--reps 10] [--new-tokens 16]

Writes experiments/results/gpu_qwen3_vl_30b.json (the command, the machine, per configuration the
median stage times). Needs one GPU with about 70 GB free.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lvlm_ctrl.backbone import Backbone, set_experts_implementation
from lvlm_ctrl.backbone.build_tiny import qwen3_vl_moe
from lvlm_ctrl.io import atomic_write_json, machine
from lvlm_ctrl.knobs import Knobs

TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            max_position_embeddings=262144, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                             "mrope_section": [24, 20, 20], "mrope_interleaved": True})
VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, out_hidden_size=2048,
              num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
TIERS = {"low": 256, "medium": 1024, "high": 4096}  # most vision tokens per image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no GPU: this benchmark times a 30B-shaped model on one")
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model, processor = qwen3_vl_moe(seed=0, text_shape=TEXT, vision_shape=VISION)
    torch.set_default_dtype(torch.float32)
    set_experts_implementation(model, "grouped_mm")
    backbone = Backbone(model, processor, TIERS, None, None, a.new_tokens, name="qwen3_vl_30b_a3b_shape")
    print(f"built in {time.time() - t0:.0f} s: {sum(p.numel() for p in model.parameters()) / 1e9:.1f} B parameters, "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    image = Image.fromarray((np.random.default_rng(0).random((1536, 2048, 3)) * 255).astype("uint8"))
    question = "What is written on the sign in the upper left corner of the picture?"
    space = backbone.space
    picks = [Knobs(t, p, k, n) for t, p, k in itertools.product(space.tiers, (1, 3, 5), (space.top_ks[0], 6, 8))
             for n in (space.num_blocks_options(p)[0], space.num_layers)]
    for knobs in picks[:3]:  # warm-up: kernels, allocator
        backbone.generate([image], [question], knobs, stop_at_eos=False)
    rows = []
    for knobs in picks:
        runs = [backbone.generate([image], [question], knobs, stop_at_eos=False) for _ in range(a.reps)]
        def med(f, runs=runs):
            return statistics.median(f(g) for g in runs)
        rows.append({**knobs.as_dict(), "vision_tokens": runs[0].vision_tokens[0], "text_tokens": runs[0].text_tokens[0],
                     "vision_ms": med(lambda g: g.vision_ms), "prefill_ms": med(lambda g: g.prefill_ms),
                     "decode_ms_per_token": med(lambda g: g.decode_ms / max(g.output_tokens[0] - 1, 1)),
                     "total_ms": med(lambda g: g.total_ms)})
        print(rows[-1], flush=True)
    totals = [r["total_ms"] for r in rows]
    report = {"command": " ".join(["python experiments/gpu_qwen3_vl_30b.py", *sys.argv[1:]]), "machine": machine(),
              "shape": {"text": TEXT, "vision": VISION, "tiers": TIERS}, "new_tokens": a.new_tokens, "reps": a.reps,
              "latency_range_ms": [min(totals), max(totals)], "configurations": rows}
    out = atomic_write_json(ROOT / "experiments" / "results" / "gpu_qwen3_vl_30b.json", report)
    print(f"latency {min(totals):.1f}-{max(totals):.1f} ms over {len(rows)} configurations; wrote {out}")


if __name__ == "__main__":
    main()
