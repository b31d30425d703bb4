"""Answer questions about images under a latency budget.

    python -m lvlm_ctrl.infer ckpt=outputs/train/<run>/checkpoints/best.ckpt image=cat.png \\
        question="what color is the shape?" budget_ms=60
    python -m lvlm_ctrl.infer controller=lookup controller.table=.../lookup_table.json image=... ...

From Python:

    from lvlm_ctrl.infer import BudgetedVQA
    vqa = BudgetedVQA.from_run("outputs/train/<run>")            # the run's model, controller, best.ckpt
    vqa.answer([("a.png", "what shape is it?", 60.0), ...])      # one dict per request
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lvlm_ctrl.controllers import serving_controller
from lvlm_ctrl.controllers.lookup import check_budget
from lvlm_ctrl.data import VQASample, load_image
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.evaluate import serve, warm_up
from lvlm_ctrl.train import RUN_CONFIG

CONF = Path(__file__).resolve().parent.parent / "conf"


def check_request(image, question, budget_ms) -> float:
    if image is None or str(image).strip() == "":
        raise UserError("no image given: pass image=PATH")
    if question is None or not str(question).strip():
        raise UserError("the question is empty: pass question=\"...\"")
    return check_budget(budget_ms)


class BudgetedVQA:
    def __init__(self, backbone, controller):
        self.backbone, self.controller = backbone, controller

    @classmethod
    def from_config(cls, cfg: DictConfig) -> BudgetedVQA:
        backbone = hydra.utils.instantiate(cfg.model)
        return cls(backbone, serving_controller(cfg, backbone))

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best.ckpt", calibration: bool = True) -> BudgetedVQA:
        """A train run's model and controller, from the config the run saved (GRPO: beside its
        checkpoints, written once the run started training; lookup: Hydra's, beside the table)."""
        run = Path(run_dir)
        grpo_cfg, hydra_cfg = run / "checkpoints" / RUN_CONFIG, run / ".hydra" / "config.yaml"
        if grpo_cfg.exists():
            cfg = OmegaConf.load(grpo_cfg)
            cfg.ckpt = str(run / "checkpoints" / checkpoint)
            cfg.controller.serving.ckpt = cfg.ckpt
        elif (run / "lookup_table.json").exists() and hydra_cfg.exists():
            cfg = OmegaConf.load(hydra_cfg)
            cfg.controller.table = str(run / "lookup_table.json")
        else:
            raise UserError(f"{run} is not a train run directory (no checkpoints/{RUN_CONFIG} or lookup_table.json)")
        cfg.calibration = OmegaConf.load(CONF / "calibration" / ("default.yaml" if calibration else "off.yaml"))
        return cls.from_config(cfg)

    def answer(self, requests) -> list[dict]:
        """requests: (image path or PIL image, question, budget_ms) triples -> one dict per request, in
        order: the answer, or {"error": ...} for a request that could not be served (the others are)."""
        out = []
        for image, question, budget_ms in requests:
            try:
                budget = check_request(image, question, budget_ms)
                img = load_image(image) if isinstance(image, (str, Path)) else image
            except UserError as err:
                out.append({"error": str(err), "budget_ms": budget_ms})
                continue
            sample = VQASample("request", str(image), str(question), ())
            gen, knobs, overhead = serve(self.backbone, self.controller, sample, img, budget)
            total = gen.total_ms + overhead
            out.append({"answer": gen.answers[0], "knobs": knobs.as_dict(), "budget_ms": budget,
                        "latency_ms": total, "within_budget": total <= budget,
                        "stages_ms": {"vision": gen.vision_ms, "prefill": gen.prefill_ms, "decode": gen.decode_ms,
                                      "controller": overhead}})
        return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="infer")
@cli
def main(cfg: DictConfig) -> None:
    budget = check_request(cfg.image, cfg.question, cfg.budget_ms)
    image = load_image(cfg.image)  # a missing or corrupt image fails before any model loads
    vqa = BudgetedVQA.from_config(cfg)
    warm_up(vqa.backbone, vqa.controller, [VQASample("request", str(cfg.image), str(cfg.question), ())], budget,
            int(cfg.get("warmup", 0)), image)
    result = vqa.answer([(image, cfg.question, budget)])[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
