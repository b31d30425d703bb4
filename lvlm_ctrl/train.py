"""Train a controller: the main job.

    python -m lvlm_ctrl.train controller=grpo budget=uniform
    python -m lvlm_ctrl.train -m controller=grpo controller.group_size=4,8 controller.lr=1e-4,3e-4
    python -m lvlm_ctrl.train controller=grpo strategy=ddp trainer.devices=2
    python -m lvlm_ctrl.train controller=lookup profile.path=outputs/profiles/easy_vqa-val-300

Both controllers learn from the offline profile at profile.path (python -m lvlm_ctrl.profile): the
lookup table aggregates it; GRPO uses it as its environment (grpo/env.py). Returns the sweep
objective (for grpo the best val/auc_slo).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.profiling import read_profile


def train_lookup(cfg: DictConfig) -> float:
    controller = hydra.utils.instantiate(cfg.controller)
    table = controller.fit(read_profile(cfg.profile.path))
    out = table.save(Path(cfg.paths.output_dir) / "lookup_table.json")
    stats = table.get_statistics()
    print(f"lookup table: {stats['num_configurations']} configurations, latency "
          f"{stats['latency_range'][0]:.1f}-{stats['latency_range'][1]:.1f} ms, accuracy "
          f"{stats['accuracy_range'][0]:.3f}-{stats['accuracy_range'][1]:.3f}; wrote {out}")
    return float(stats["mean_accuracy"])


def train_grpo(cfg: DictConfig) -> float:
    from lvlm_ctrl.grpo.env import ProfileEnv, language_features, latency_tokens, prompt_states
    from lvlm_ctrl.grpo.module import GRPOModule
    from lvlm_ctrl.grpo.policy import TwoStagePolicy
    from lvlm_ctrl.grpo.rewards import RewardConfig
    from lvlm_ctrl.latency_model import LatencyModel, held_out_mask

    c = cfg.controller
    backbone = hydra.utils.instantiate(cfg.model)
    latency_model = LatencyModel.load(cfg.latency.model) if cfg.latency.source == "predicted" else None
    env = ProfileEnv(read_profile(cfg.profile.path), backbone.space, latency_model)
    by_id = {s.sample_id: s for s in hydra.utils.instantiate(cfg.data).samples}
    missing = [i for i in env.sample_ids if i not in by_id]
    if missing:
        raise UserError(f"{len(missing)} profiled samples (e.g. {missing[0]}) are not in data={cfg.data.name} "
                        f"split={cfg.data.split} limit={cfg.data.limit}; pass the split the profile was made on")
    samples = [by_id[i] for i in env.sample_ids]
    # clone: tensors made under inference_mode cannot be module buffers that DDP broadcasts
    lang = language_features(backbone, [s.question for s in samples]).clone()
    if c.budget_token:  # the latency token depends on the budget: keep the prompts' states instead
        states = [tuple(t.clone() for t in tier) for tier in prompt_states(backbone, samples)]
        tokens = torch.empty(0)
    else:
        states, tokens = None, latency_tokens(backbone, samples).clone()
    held = torch.tensor(held_out_mask(env.sample_ids, c.val_fraction))
    train_idx, val_idx = torch.where(~held)[0], torch.where(held)[0]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise UserError("too few profiled samples to hold out a validation set; profile more samples")
    env.use_for_slo(train_idx)
    policy = TwoStagePolicy(backbone.space, d_model=lang.shape[1], hidden=c.hidden, budget_token=c.budget_token)
    budgets = hydra.utils.instantiate(cfg.budget).bind(env.feasible)
    val_budgets = torch.linspace(*env.feasible, c.val_num_budgets).tolist()
    module = GRPOModule(policy, env, lang, tokens, budgets, RewardConfig(**c.reward), group_size=c.group_size,
                        lr=c.lr, clip_eps=c.clip_eps, kl_coef=c.kl_coef, entropy_coef=c.entropy_coef,
                        num_iterations=c.num_iterations, scale_rewards=c.scale_rewards,
                        stage2_warmup_steps=c.stage2_warmup_steps, val_budgets=val_budgets,
                        val_max_violation=c.val_max_violation, backbone=backbone if c.budget_token else None,
                        prompt_states=states)
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_idx), batch_size=c.batch_size,
                                               shuffle=True, drop_last=len(train_idx) > c.batch_size)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(val_idx), batch_size=len(val_idx))
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [hydra.utils.instantiate(cb) for cb in (cfg.get("callbacks") or {}).values()]
    if not logger:
        callbacks = [cb for cb in callbacks if not isinstance(cb, L.pytorch.callbacks.LearningRateMonitor)]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        ckpt_path = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    if ckpt_path and not Path(ckpt_path).exists():
        raise UserError(f"no checkpoint to resume at {ckpt_path}; pass hydra.run.dir=<the run> with ckpt_path=last")
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    if isinstance(logger, L.pytorch.loggers.WandbLogger) and trainer.is_global_zero:
        # a multirun runs its jobs in one process: without finish(), the next job's wandb.init
        # would hand back this run and every job would log into the first one
        logger.experiment.finish()
    ckpt = trainer.checkpoint_callback
    monitor = (ckpt.monitor if ckpt else None) or "val/auc_slo"
    best = ckpt.best_model_score if ckpt else None
    score = float(best) if best is not None else float(trainer.callback_metrics.get(monitor, 0.0))
    if trainer.is_global_zero:
        print(f"best {monitor} {score:.4f}; checkpoints in {Path(cfg.paths.output_dir) / 'checkpoints'}")
    return score


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@cli
def main(cfg: DictConfig) -> float:
    L.seed_everything(cfg.seed, workers=True)
    kind = cfg.controller._target_.rsplit(".", 1)[-1]
    if kind == "LookupController":
        return train_lookup(cfg)
    if kind == "GRPOController":
        return train_grpo(cfg)
    raise UserError(f"controller {kind} is not trained; choose controller=grpo or controller=lookup")


if __name__ == "__main__":
    main()
