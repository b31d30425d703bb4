"""Train a controller: the main job.

    python -m lvlm_ctrl.train controller=grpo budget=uniform
    python -m lvlm_ctrl.train -m controller=grpo controller.group_size=4,8 controller.lr=1e-4,3e-4
    python -m lvlm_ctrl.train controller=grpo strategy=ddp trainer.devices=2
    python -m lvlm_ctrl.train controller=lookup
    python -m lvlm_ctrl.train controller=grpo budget=uniform controller.env=online data.limit=2000

Both controllers learn from the offline profile at profile.path, which the ProfileDataModule
(data/profiles.py) prepares first when there is none; with controller.env=online, GRPO's rollouts run
on the live backbone instead (grpo/online.py) and only the latency model is prepared. What the controller config instantiates
decides the training: a LightningModule (GRPO) is fitted by a Lightning Trainer on that DataModule;
a controller with `fit(profile)` (the lookup table) aggregates the profile. Returns the sweep
objective (GRPO: the best val/auc_slo).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lvlm_ctrl.controllers import training_node
from lvlm_ctrl.data.profiles import check_env
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import atomic_write_text, check_writable

RUN_CONFIG = "config.yaml"  # beside the checkpoints: the config of the run that wrote them (infer.from_run)


def env_options(cfg: DictConfig) -> tuple[str, dict | None]:
    """controller.env and its options, checked."""
    env = cfg.controller.get("env", "profile")
    online = OmegaConf.to_container(cfg.controller.online) if cfg.controller.get("online") else None
    check_env(env, online, cfg.profile.get("latency_model"))
    return env, online


# options one environment reads and the other does not: given for the other, they would do nothing
ENV_ONLY = {"online": ("controller.online",), "profile": ("profile.answer_batch_size",)}


def check_overrides(env: str, overrides: list[str]) -> None:
    """A one-line error for a command-line option the chosen controller.env never reads."""
    for other, prefixes in ENV_ONLY.items():
        if other == env:
            continue
        for item in overrides:
            key = item.split("=", 1)[0].lstrip("+~")
            if any(key == p or key.startswith(p + ".") for p in prefixes):
                raise UserError(f"{key} applies with controller.env={other} only, and this run trains with "
                                f"controller.env={env}: drop it, or pass controller.env={other}")


def build_data(cfg: DictConfig, backbone):
    """The training data: the profile, or for controller.env=online the live environment's."""
    dataset = hydra.utils.instantiate(cfg.data)
    env, online = env_options(cfg)
    return hydra.utils.instantiate(cfg.profile, backbone=backbone, dataset=dataset, seed=cfg.seed, env=env,
                                   online=online)


def check_checkpoint(path) -> None:
    """A checkpoint to resume from loads (weights_only: nothing in it runs), or a one-line error."""
    import torch

    if not Path(str(path)).is_file():
        raise UserError(f"no checkpoint to resume at {path}; pass hydra.run.dir=<the run> with ckpt_path=last")
    try:
        torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read it is the same answer for the user
        first = (str(err).splitlines() or [err.__class__.__name__])[0]
        raise UserError(f"cannot resume from {path} ({first[:160]}): it is truncated, not a checkpoint, or holds more "
                        "than tensors and plain values; pass another ckpt_path") from None


def train_lookup(cfg: DictConfig, controller, data) -> float:
    table = controller.fit(data.profile(), data.dataset.samples)
    table.validate(data.backbone.space, data.source)
    out = table.save(Path(cfg.paths.output_dir) / "lookup_table.json")
    stats = table.get_statistics()
    print(f"lookup table: {stats['num_configurations']} configurations, latency "
          f"{stats['latency_range'][0]:.1f}-{stats['latency_range'][1]:.1f} ms, accuracy "
          f"{stats['accuracy_range'][0]:.3f}-{stats['accuracy_range'][1]:.3f}; wrote {out}")
    return float(stats["mean_accuracy"])


def checkpoint_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir) / "checkpoints"


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from (ckpt_path, `last` = this run's last.ckpt), checked to load; or None."""
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        ckpt_path = str(checkpoint_dir(cfg) / "last.ckpt")
    if ckpt_path:
        check_checkpoint(ckpt_path)
    return ckpt_path


def train_module(cfg: DictConfig, module: L.LightningModule, data, ckpt_path: str | None) -> float:
    ckpt_dir = checkpoint_dir(cfg)
    if not ckpt_path and any(ckpt_dir.glob("*.ckpt")):
        raise UserError(f"{ckpt_dir} already holds checkpoints of another run: resume it with ckpt_path=last, or "
                        "train into a new directory (hydra.run.dir=...)")
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [hydra.utils.instantiate(cb) for cb in (cfg.get("callbacks") or {}).values()]
    if not logger:
        callbacks = [cb for cb in callbacks if not isinstance(cb, L.pytorch.callbacks.LearningRateMonitor)]
    trainer_cfg = cfg.trainer
    max_steps, every = trainer_cfg.get("max_steps", -1), trainer_cfg.get("val_check_interval")
    if isinstance(every, int) and 0 < max_steps < every:  # every run ends validated, with a checkpoint
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"val_check_interval": max_steps})
    trainer = hydra.utils.instantiate(trainer_cfg, logger=logger, callbacks=callbacks)
    if trainer.is_global_zero:
        atomic_write_text(ckpt_dir / RUN_CONFIG, OmegaConf.to_yaml(run_config(cfg)))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    if isinstance(logger, L.pytorch.loggers.WandbLogger) and trainer.is_global_zero:
        # a multirun runs its jobs in one process: without finish(), the next job's wandb.init
        # would hand back this run and every job would log into the first one
        logger.experiment.finish()
    ckpt = trainer.checkpoint_callback
    if trainer.fast_dev_run and ckpt is not None and ckpt.monitor in trainer.callback_metrics:
        score = float(trainer.callback_metrics[ckpt.monitor])  # a smoke run: Lightning keeps no checkpoint
        print(f"fast_dev_run: {ckpt.monitor} {score:.4f} (no checkpoint)")
        return score
    if ckpt is None or ckpt.best_model_score is None:
        raise UserError("training ended without a validation (trainer.limit_val_batches=0?): no checkpoint was "
                        "chosen; let it validate")
    score = float(ckpt.best_model_score)
    if trainer.is_global_zero:
        print(f"best {ckpt.monitor} {score:.4f}; checkpoints in {ckpt_dir}")
    return score


def run_config(cfg: DictConfig) -> DictConfig:
    """The resolved config without Hydra's own node: what serving this run needs to rebuild it."""
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.create(OmegaConf.to_container(plain, resolve=True))


def train(cfg: DictConfig) -> float:
    check_writable(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    target = hydra.utils.get_class(cfg.controller._target_)
    trained = issubclass(target, L.LightningModule)
    env = env_options(cfg)[0]
    if env != "profile" and not trained:  # checked before any work, as the budgets are
        raise UserError(f"controller={cfg.controller_name} learns from a profile: drop controller.env")
    if HydraConfig.initialized():
        check_overrides(env, list(HydraConfig.get().overrides.task))
    budgets = hydra.utils.instantiate(cfg.budget) if trained else None  # bad options fail before any work
    ckpt_path = resume_path(cfg) if trained else None
    backbone = hydra.utils.instantiate(cfg.model)
    data = build_data(cfg, backbone)
    if trained:
        return train_module(cfg, hydra.utils.instantiate(training_node(cfg.controller), backbone=backbone,
                                                         budgets=budgets, _convert_="all"), data, ckpt_path)
    if hasattr(target, "fit"):
        return train_lookup(cfg, hydra.utils.instantiate(cfg.controller), data)
    raise UserError(f"controller {cfg.controller_name} is not trained (it neither is a LightningModule nor has "
                    "fit); choose controller=grpo or controller=lookup")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@cli
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
