"""Is this checkpoint driven right? Conformance of our path with the model's own forward and
generate, and that every knob acts, on one request (lvlm_ctrl/backbone/conformance.py):

    python -m lvlm_ctrl.check model=qwen3_vl_moe model.path=/models/Qwen3-VL-30B-A3B-Instruct

Exits 1 with one line per failed check; writes check.json into the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lvlm_ctrl.backbone.conformance import check
from lvlm_ctrl.data import load_image
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import atomic_write_json, check_writable, command, machine


@hydra.main(version_base="1.3", config_path="../conf", config_name="check")
@cli
def main(cfg: DictConfig) -> None:
    out = check_writable(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir) / "check.json"
    backbone = hydra.utils.instantiate(cfg.model)
    if cfg.image is not None:
        if not cfg.question or not str(cfg.question).strip():
            raise UserError("the question is empty: pass question=\"...\" with image=")
        image, question = load_image(str(cfg.image)), str(cfg.question)
    else:
        sample = hydra.utils.instantiate(cfg.data, limit=1).samples[0]
        image, question = sample.load_image().resize(tuple(cfg.image_size)), sample.question
    report = check(backbone, image, question, cfg.tolerance)
    atomic_write_json(out, {**report, "routed_experts": {str(k): v for k, v in report["routed_experts"].items()},
                            "model": str(cfg.model.path), "command": command("lvlm_ctrl.check"), "machine": machine()})
    print(f"{report['family']}: max |logit difference| {report['max_logit_difference']:.3g}, "
          f"vision tokens per tier {report['vision_tokens']}, experts routed per top_k {report['routed_experts']}")
    for line in report["failures"]:
        print(f"FAILED: {line}", file=sys.stderr)
    print(f"wrote {Path(out)}")
    if report["failures"]:
        sys.exit(1)
    print("every check passed")


if __name__ == "__main__":
    main()
