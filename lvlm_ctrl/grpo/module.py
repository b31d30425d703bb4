"""The GRPO LightningModule: the frozen backbone's features, the two heads, group sampling.

One training step, per batch of samples: draw a budget per sample, sample G configurations per
(sample, budget) from the current policy, score them (the environment: ProfileEnv reads an offline
profile, OnlineEnv runs the live backbone), normalise rewards within each
group, and take `num_iterations` clipped policy-gradient steps on those rollouts (manual
optimisation). Validation takes the argmax configuration at a grid of budgets, guarded as serving
is (`guard`: never a configuration whose profiled p95 is over the budget when one fits).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torchmetrics import MeanMetric

from lvlm_ctrl.data import size_class
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.grpo.env import budget_token_latency_tokens, language_features, latency_tokens, prompt_states
from lvlm_ctrl.grpo.loss import group_advantages, grpo_loss
from lvlm_ctrl.grpo.policy import (
    HEADS,
    STAGE2,
    Decision,
    TwoStagePolicy,
    fitting,
    image_size_features,
    token_count_features,
)
from lvlm_ctrl.grpo.rewards import RewardConfig, reward_components, total_reward
from lvlm_ctrl.io import atomic_write_json
from lvlm_ctrl.knobs import KnobSpace


class GRPOModule(L.LightningModule):
    """Trained by `python -m lvlm_ctrl.train controller=grpo` with a ProfileDataModule (data/profiles.py),
    whose environment and samples `setup` takes. A trained one restores with the standard API,
    `GRPOModule.load_from_checkpoint(path, weights_only=True)` (controllers/grpo.py: load_policy):
    its hyperparameters are plain types, so loading a checkpoint never runs code from it."""

    def __init__(self, backbone=None, budgets=None, *, space: dict | None = None, d_model: int | None = None,
                 group_size: int = 16, lr: float = 3e-4, weight_decay: float = 0.0, clip_eps: float = 0.2,
                 kl_coef: float = 0.0, entropy_coef: float = 0.05, num_iterations: int = 1,
                 scale_rewards: str = "none", stage2_warmup_steps: int = 0, hidden: int = 256, budget_dim: int = 256,
                 budget_token: bool = False, val_num_budgets: int = 10, val_max_violation: float = 0.05,
                 guard: bool = True, image_size: bool = False, group_by: str | None = None,
                 token_counts: bool = False, reward: dict | None = None):
        """backbone and budgets: for training (a Budgets of grpo/budgets.py); without them (serving, or
        load_from_checkpoint) the policy is built from `space` and `d_model`."""
        super().__init__()
        self.automatic_optimization = False
        if backbone is not None:
            space = asdict(backbone.space)
            d_model = backbone.model.get_input_embeddings().embedding_dim
        if space is None or d_model is None:
            raise ValueError("GRPOModule needs a backbone, or the knob space and d_model of the one it was trained on")
        space = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in dict(space).items()}
        reward = dict(reward or {})
        self.save_hyperparameters({
            "space": space, "d_model": int(d_model), "group_size": group_size, "lr": lr, "weight_decay": weight_decay,
            "clip_eps": clip_eps, "kl_coef": kl_coef, "entropy_coef": entropy_coef, "num_iterations": num_iterations,
            "scale_rewards": scale_rewards, "stage2_warmup_steps": stage2_warmup_steps, "hidden": hidden,
            "budget_dim": budget_dim, "budget_token": bool(budget_token), "val_num_budgets": val_num_budgets,
            "val_max_violation": val_max_violation, "guard": bool(guard), "image_size": bool(image_size), "group_by": group_by,
            "token_counts": bool(token_counts), "reward": reward})
        knob_space = KnobSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in space.items()})
        self.policy = TwoStagePolicy(knob_space, d_model=int(d_model), budget_dim=budget_dim, hidden=hidden,
                                     budget_token=budget_token, image_size=image_size,
                                     token_counts=bool(token_counts))
        self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False) if kl_coef else None
        self.backbone, self.budgets = backbone, budgets  # not submodules: frozen or stateless, never saved
        self.reward = RewardConfig(**reward)
        self.group_size, self.lr, self.weight_decay = group_size, lr, weight_decay
        self.clip_eps, self.kl_coef, self.entropy_coef = clip_eps, kl_coef, entropy_coef
        self.num_iterations, self.scale_rewards = num_iterations, scale_rewards
        self.stage2_warmup_steps = stage2_warmup_steps
        self.val_max_violation = val_max_violation
        self.guard = bool(guard)
        if group_by not in (None, "size"):
            raise UserError(f"controller.group_by={group_by!r}: choose size or null")
        self.group_by = group_by
        self.val_budgets: list[float] = []
        self.val_acc = torch.nn.ModuleList(MeanMetric() for _ in range(val_num_budgets))
        self.val_violation = torch.nn.ModuleList(MeanMetric() for _ in range(val_num_budgets))
        self.val_ratio = torch.nn.ModuleList(MeanMetric() for _ in range(val_num_budgets))
        self.val_in_budget = torch.nn.ModuleList(MeanMetric() for _ in range(val_num_budgets))
        self.env, self.prompt_states = None, None
        # what serving needs beside the policy: the feasible range (default budgets) and the profile's
        # median latency per configuration (tiers, P, K, N; NaN where invalid), which latency
        # calibration compares measured requests with, and its 95th percentile (the argmax guard);
        # saved in the checkpoint as plain lists
        self.serving: dict = {}

    def setup(self, stage: str) -> None:
        """The environment and the controller's inputs, from the trainer's ProfileDataModule."""
        if self.env is not None:
            return
        if self.backbone is None or self.budgets is None:
            raise ValueError("training needs GRPOModule(backbone, budgets, ...)")
        data = self.trainer.datamodule
        self.env = data.env
        self.budgets.bind(self.env.feasible)
        self.val_budgets = torch.linspace(*self.env.feasible, len(self.val_acc)).tolist()
        if self.group_by:  # the image's size class: latency statistics per group (ProfileEnv.set_groups)
            self.env.set_groups([size_class(*s.image_size()) for s in data.samples])
        self.serving = self.serving_stats()
        questions = [s.question for s in data.samples]
        # clone: tensors made under inference_mode cannot be module buffers that DDP broadcasts
        lang = language_features(self.backbone, questions)
        if self.policy.n_input:  # the image's size, read from the file's header
            sizes = image_size_features([s.image_size() for s in data.samples])
            lang = torch.cat([lang, torch.from_numpy(sizes)], dim=-1)
        self.register_buffer("lang", lang.clone(), persistent=False)
        if self.policy.budget_token is not None:  # the latency token depends on the budget: keep prompt states
            self.prompt_states = [tuple(t.clone() for t in tier) for tier in prompt_states(self.backbone, data.samples)]
            tokens = torch.empty(0)
        else:  # only the questions training or validation reads (an online pool leaves most out); NaN elsewhere
            used = torch.cat([data.train_idx, data.val_idx]).unique()
            part = latency_tokens(self.backbone, [data.samples[i] for i in used.tolist()])
            tokens = part.new_full((len(data.samples), *part.shape[1:]), float("nan"))
            tokens[used] = part
        self.register_buffer("tokens", tokens, persistent=False)
        counts = torch.from_numpy(token_count_features(self.env.token_counts[..., 0], self.env.token_counts[..., 1]))
        self.register_buffer("counts", counts, persistent=False)  # (S, tiers, 2)

    def serving_stats(self) -> dict:
        env = self.env
        return {"feasible_ms": list(env.feasible), "config_latency_ms": env.latency.nanmedian(0).values.tolist(),
                "config_p95_ms": env.p95.tolist(), "group_p95_ms": dict(zip(env.group_names, env.group_p95.tolist()))}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.env is not None:  # the online environment's latency statistics move as it refits
            self.serving = self.serving_stats()
        checkpoint["serving"] = self.serving
        if hasattr(self.env, "state_dict"):  # the online environment's rollouts, for a resumed run
            checkpoint["env"] = self.env.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # resuming: setup() has bound the environment already; serving loads without one
        if checkpoint.get("env") is not None and hasattr(self.env, "load_state_dict"):
            self.env.load_state_dict(checkpoint["env"])
            self.serving = self.serving_stats()
        else:
            self.serving = checkpoint.get("serving", {})

    def on_fit_start(self):
        if self.backbone is not None:
            self.backbone.model.to(self.device)

    def on_fit_end(self):
        report = self.env.report() if self.env is not None else {}
        if report and self.trainer.is_global_zero:
            atomic_write_json(Path(self.trainer.default_root_dir) / "online_env.json", report)

    def latency_tokens(self, policy: TwoStagePolicy, idx: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """(B, tiers, P, d) for samples idx at their budgets: precomputed, or the budget token's pass
        (differentiable in the policy's budget token)."""
        if policy.budget_token is None:
            tokens = self.tokens[idx]
        else:
            tokens = budget_token_latency_tokens(self.backbone, policy.budget_query(budget), self.prompt_states, idx.cpu())
        if policy.n_counts:  # stage 2's token counts ride on its latency token, the same at every p
            counts = self.counts[idx][:, :, None].expand(-1, -1, tokens.shape[2], -1)
            tokens = torch.cat([tokens, counts.to(tokens)], dim=-1)
        return tokens

    def group_tokens(self, policy: TwoStagePolicy, idx: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """latency_tokens for every rollout: each input's row repeated group_size times."""
        return self.latency_tokens(policy, idx, budget).repeat_interleave(self.group_size, dim=0)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    @property
    def warming_up(self) -> bool:
        """Stage-2 warm-up: (tier, p) drawn uniformly and only stage 2 trained. Until stage 2 can fit
        a tier into the budget, every tier but the cheapest scores badly, and stage 1, trained from
        the start, collapses onto the cheapest for good (its entropy reaches 0 within 100 steps)."""
        return self.global_step < self.stage2_warmup_steps

    # ---- rollouts ----------------------------------------------------------------------
    def rollout(self, idx: torch.Tensor):
        g = self.group_size
        budget = self.budgets.sample(len(idx)).to(self.lang.device)
        rows = idx.repeat_interleave(g)
        budget_rows = budget.repeat_interleave(g)
        # with the budget token, differentiable: the first policy step reuses them
        tokens = self.group_tokens(self.policy, idx, budget)
        lang = self.lang[rows]
        decision = self.policy.act(lang, tokens, budget_rows, uniform_stage1=self.warming_up)
        d = _cpu(decision)
        acc, lat = self.env.outcome(rows.cpu(), d)
        miss = (self.env.miss_rate(d, budget_rows.cpu() * (1 + self.reward.slo_tolerance), rows.cpu())
                if self.reward.slo else None)
        comps = reward_components(self.reward, acc, lat, budget_rows.cpu(), self.env.complexity(d), miss)
        return rows, budget, lang, tokens, decision, comps, acc, lat

    def training_step(self, batch, batch_idx):
        idx = batch[0] if isinstance(batch, (list, tuple)) else batch
        opt = self.optimizers()
        _rows, budget_per_input, lang, tokens, decision, comps, acc, lat = self.rollout(idx)
        budget = budget_per_input.repeat_interleave(self.group_size)
        rewards = total_reward(comps).to(self.lang.device)
        adv, zero_std = group_advantages(rewards.view(-1, self.group_size), self.scale_rewards)
        adv = adv.reshape(-1)
        heads = STAGE2 if self.warming_up else HEADS
        with torch.no_grad():
            logp_old, _ = self.policy.log_prob_and_entropy(lang, tokens, budget, decision, heads)
            if self.ref_policy is not None:
                ref_tokens = self.group_tokens(self.ref_policy, idx, budget_per_input)
                logp_ref = self.ref_policy.log_prob_and_entropy(lang, ref_tokens, budget, decision, heads)[0]
            else:
                logp_ref = logp_old
        for step in range(self.num_iterations):
            if self.policy.budget_token is not None and step > 0:  # the token moved with the last step
                tokens = self.group_tokens(self.policy, idx, budget_per_input)
            logp, ent = self.policy.log_prob_and_entropy(lang, tokens, budget, decision, heads)
            entropy = torch.stack([ent[h] for h in heads]).sum(0)
            loss, stats = grpo_loss(logp, logp_old, adv, self.clip_eps, logp_ref, self.kl_coef, entropy,
                                    self.entropy_coef)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        n = len(idx)
        log = {"train/loss": loss.detach(), "train/reward_mean": rewards.mean(), "train/reward_std": rewards.std(),
               "train/frac_zero_std_groups": zero_std, "train/clip_ratio": stats["clip_ratio"],
               "train/kl": stats["kl"], "train/accuracy": acc.mean(), "train/violation_rate": (lat > budget.cpu()).float().mean(),
               "train/latency_over_budget": (lat / budget.cpu()).mean()}
        for name, value in comps.items():
            log[f"reward/{name}_mean"] = value.mean()
            log[f"reward/{name}_std"] = value.std()
        for name, value in ent.items():
            log[f"entropy/{name}"] = value.mean().detach()
        for head in HEADS:
            choice = getattr(decision, head).float()
            log[f"knobs/{head}_mean_index"] = choice.mean()
        log.update(self.env.metrics())
        self.log_dict({k: float(v) for k, v in log.items()}, batch_size=n, prog_bar=False)
        self.log("reward", float(rewards.mean()), prog_bar=True, batch_size=n)

    # ---- validation: argmax at a grid of budgets ------------------------------------------
    def validation_step(self, batch, batch_idx):
        idx = batch[0] if isinstance(batch, (list, tuple)) else batch
        for i, b in enumerate(self.val_budgets):
            budget = torch.full((len(idx),), b, device=self.lang.device)
            p95 = self.env.group_p95[self.env.group_of[idx.cpu()]]  # each row's group's p95
            fits = fitting(p95, budget.cpu()).to(self.device) if self.guard else None
            d = self.policy.act(self.lang[idx], self.latency_tokens(self.policy, idx, budget), budget, greedy=True,
                                fits=fits)
            acc, lat = self.env.outcome(idx.cpu(), _cpu(d))
            self.val_acc[i].update(acc.to(self.device))
            self.val_violation[i].update((lat > b).float().to(self.device))
            self.val_ratio[i].update((lat / b).to(self.device))
            self.val_in_budget[i].update((acc * (lat <= b)).to(self.device))

    def on_validation_epoch_end(self):
        # compute() syncs across processes (DDP) before anything is logged
        accs, viols, ratios, in_budget = ([m.compute().cpu() for m in ms] for ms in
                                          (self.val_acc, self.val_violation, self.val_ratio, self.val_in_budget))
        for b, a, v, r in zip(self.val_budgets, accs, viols, ratios):
            self.log_dict({f"val_curve/accuracy@{b:.0f}ms": a, f"val_curve/violation@{b:.0f}ms": v,
                           f"val_curve/latency_over_budget@{b:.0f}ms": r})
        for metrics in (self.val_acc, self.val_violation, self.val_ratio, self.val_in_budget):
            for m in metrics:
                m.reset()
        self.log("val/auc", budget_auc(self.val_budgets, accs), prog_bar=True)
        # an answer over budget counts as wrong, so always running the full model does not win
        self.log("val/auc_in_budget", budget_auc(self.val_budgets, in_budget), prog_bar=True)
        slo = slo_accuracy(accs, viols, in_budget, self.val_max_violation)
        self.log("val/auc_slo", budget_auc(self.val_budgets, slo), prog_bar=True)
        self.log("val/accuracy", torch.stack(accs).mean())
        self.log("val/violation_rate", torch.stack(viols).mean())
        self.log("val/max_violation_rate", torch.stack(viols).max())
        if isinstance(self.logger, WandbLogger) and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            import wandb

            curve = [[b, float(a), float(v)] for b, a, v in zip(self.val_budgets, accs, viols)]
            table = wandb.Table(columns=["budget_ms", "accuracy", "violation_rate"], data=curve)
            self.logger.experiment.log({"val/accuracy_vs_budget": table, "val/accuracy_vs_budget_plot":
                                        wandb.plot.line(table, "budget_ms", "accuracy", title="accuracy vs budget"),
                                        "trainer/global_step": self.global_step})


def budget_auc(budgets: list[float], values: list[torch.Tensor]) -> torch.Tensor:
    """Area under value vs budget, normalised by the budget range (the mean for a single budget)."""
    if len(budgets) < 2:
        return torch.stack(values).mean()
    xs = torch.tensor(budgets)
    return torch.trapezoid(torch.stack(values), xs) / (xs[-1] - xs[0])


def slo_accuracy(accs, violations, in_budget, max_violation: float) -> list:
    """best.ckpt's criterion, a service-level objective per budget: kept at least 1 - max_violation
    of the time, its accuracy; missed more often, its in-budget accuracy (late answers count wrong).
    In-budget accuracy alone would trade 4 points of accuracy for 3% fewer violations, which the
    objective allows."""
    return [a if v <= max_violation else ib for a, v, ib in zip(accs, violations, in_budget)]


def _cpu(d: Decision) -> Decision:
    return Decision(d.tier.cpu(), d.insertion.cpu(), d.top_k.cpu(), d.num_blocks.cpu())
