"""Controllers map (question, budget_ms) to a configuration of the knob space.

Every controller has `bind(backbone)` (learn the knob space it serves) and either
`decide(sample, budget_ms) -> Knobs` (timed by evaluation as the controller's overhead) or, for a
two-stage controller that decides inside the serving pass, `serve(...)`. Controllers that decide
from profiled latency (lookup, grpo) also take a `calibration` (calibration.py) and `observe` each
served request, so that their budgets hold when the machine's speed drifts.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from lvlm_ctrl.calibration import LatencyCalibration
from lvlm_ctrl.errors import UserError


def training_node(controller: DictConfig) -> DictConfig:
    """The controller's config without its `serving` part and the environment's options (the
    training data takes those): what train instantiates."""
    node = OmegaConf.to_container(controller, resolve=True)  # its interpolations point into the whole config
    for key in ("serving", "env", "online"):
        node.pop(key, None)
    return OmegaConf.create(node)


def serving_controller(cfg: DictConfig, backbone):
    """The controller evaluate and infer serve through (a trained controller's `serving` part),
    bound to the backbone, with latency calibration as cfg.calibration says."""
    calibration = None
    if cfg.get("calibration") is not None:
        try:  # checked first, whichever controller: a bad option fails before any model loads
            calibration = LatencyCalibration(**OmegaConf.to_container(cfg.calibration))
        except (TypeError, ValueError) as err:
            raise UserError(f"bad calibration option: {err}; see conf/calibration/default.yaml") from None
    node = cfg.controller.serving if "serving" in cfg.controller else cfg.controller
    controller = hydra.utils.instantiate(node).bind(backbone)
    if hasattr(controller, "calibration") and calibration is not None and calibration.enabled:
        calibration.reset(controller.profiled_range())
        controller.calibration = calibration
    return controller
