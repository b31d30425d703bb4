"""The trained two-stage controller at serving time (evaluate, infer).

Stage 1 reads the question (the backbone's tokenizer and input embeddings) and the budget and picks
(tier, p) before the image is processed; stage 2 runs inside the serving prefill, after block p-1,
on the latency token, and picks (top_k, num_blocks). Decisions are the argmax (argmax_kernel.py),
guarded as in validation: only among configurations whose profiled p95 fits the budget.
The controller's own time (both stages) is reported as its overhead. Stage 1's question feature
(tokenizer, embeddings, first matmul) depends on the question string alone and is cached per string
(`question_cache` entries; 0 = off): VQA traffic repeats its questions, and each miss costs ~0.1 ms
of cold-cache tokenizing right after the previous request's forward pass. With a calibration
(calibration.py, on by default in evaluate and infer) the policy decides for the budget as the
profile's machine would see it, so budgets hold when this machine runs slower or faster.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import torch

from lvlm_ctrl.calibration import LatencyCalibration
from lvlm_ctrl.controllers.argmax_kernel import ArgmaxKernel
from lvlm_ctrl.data import size_class
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.grpo.policy import TwoStagePolicy, image_size_features, token_count_features
from lvlm_ctrl.knobs import Knobs


def load_policy(ckpt: str | Path) -> tuple[TwoStagePolicy, dict]:
    """A trained policy and what serving needs of its run (feasible_ms, config_latency_ms, d_model).

    The checkpoint loads with torch.load(weights_only=True) through the standard Lightning API: a
    checkpoint that carries anything but tensors and plain values is refused, never run."""
    from lvlm_ctrl.grpo.module import GRPOModule

    path = Path(str(ckpt))
    if not path.is_file():
        raise UserError(f"no checkpoint file at {path}: pass ckpt=<run>/checkpoints/best.ckpt, written by "
                        "python -m lvlm_ctrl.train controller=grpo")
    try:
        module = GRPOModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = ("it holds objects beyond tensors and plain values, which could run code on load"
                  if "Weights only load failed" in str(err) else "it is not a PyTorch checkpoint")
        raise UserError(f"refusing to load {path}: {reason}; pass a checkpoint written by "
                        "python -m lvlm_ctrl.train controller=grpo") from None
    except TypeError as err:
        raise UserError(f"{path} was written by an older lvlm_ctrl ({str(err).splitlines()[0]}); retrain it with "
                        "python -m lvlm_ctrl.train controller=grpo") from None
    except (KeyError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise UserError(f"{path} is not a GRPO controller checkpoint ({first}); pass a checkpoint written by "
                        "python -m lvlm_ctrl.train controller=grpo") from None
    if not module.serving:
        raise UserError(f"{path} holds no serving information (feasible range, profiled latency): it was written "
                        "by an older lvlm_ctrl; retrain it with python -m lvlm_ctrl.train controller=grpo")
    return module.policy.eval(), {**module.hparams, **module.serving}


class GRPOController:
    name = "grpo"

    def __init__(self, ckpt: str | None = None, question_cache: int = 4096, guard: bool | None = None):
        """guard: the argmax guard (policy.fitting) on or off; None: as the checkpoint was validated."""
        if isinstance(question_cache, bool) or not isinstance(question_cache, int) or question_cache < 0:
            raise UserError(f"controller.serving.question_cache={question_cache!r}: give a number of entries >= 0 "
                            "(0 = off)")
        if guard is not None and not isinstance(guard, bool):
            raise UserError(f"controller.serving.guard={guard!r}: give true, false or null (as trained)")
        self.ckpt, self.question_cache, self.guard = ckpt, question_cache, guard
        self.calibration: LatencyCalibration | None = None  # evaluate / infer set it (calibration.py)
        self.group_by: str | None = None  # the guard's p95 per image size class (bind: as trained)
        self.policy: TwoStagePolicy | None = None
        self.questions: dict[str, np.ndarray] = {}  # stage 1's first layer on the question, per question
        self.queries: dict[float, torch.Tensor] = {}  # the budget token's embedding per budget

    def bind(self, backbone) -> GRPOController:
        if not self.ckpt:
            raise UserError("controller=grpo needs ckpt=PATH (a checkpoint written by python -m lvlm_ctrl.train)")
        self.policy, self.hparams = load_policy(self.ckpt)
        if self.policy.space != backbone.space:
            raise UserError(f"checkpoint {self.ckpt} was trained for another knob space ({self.policy.space}) "
                            f"than this backbone's ({backbone.space})")
        guard = self.hparams.get("guard", False) if self.guard is None else self.guard
        p95 = self.hparams.get("config_p95_ms")
        if guard and p95 is None:
            raise UserError(f"controller.serving.guard=true needs a checkpoint that records its profile's p95 latency; "
                            f"{self.ckpt} does not (retrain it, or pass controller.serving.guard=false)")
        self.group_by = self.hparams.get("group_by")
        if guard and self.group_by and self.hparams.get("group_p95_ms"):
            p95 = {g: torch.tensor(v) for g, v in self.hparams["group_p95_ms"].items()}
        elif guard:
            p95 = torch.tensor(p95)
        self.kernel = ArgmaxKernel(self.policy, self.hparams["d_model"], p95 if guard else None)
        self.questions.clear()  # another checkpoint's features
        self.queries.clear()
        self.embeddings = embedding_view(backbone)
        self.expected = np.array(self.hparams["config_latency_ms"], dtype=np.float64)
        return self

    def profiled_latency(self, knobs: Knobs) -> float:
        """The training profile's median latency of a configuration (what calibration compares with)."""
        s = self.policy.space
        return float(self.expected[s.tiers.index(knobs.tier), s.insertions.index(knobs.insertion),
                                   s.top_ks.index(knobs.top_k), knobs.num_blocks - s.num_blocks_options(
                                       knobs.insertion)[0]])

    def profiled_configurations(self) -> list[tuple[Knobs, float]]:
        return [(k, self.profiled_latency(k)) for k in self.policy.space.configurations()]

    def profiled_range(self) -> tuple[float, float]:
        return tuple(float(x) for x in (np.nanmin(self.expected), np.nanmax(self.expected)))

    def default_budgets(self, n: int) -> list[float]:
        lo, hi = self.hparams["feasible_ms"]
        return [float(b) for b in torch.linspace(lo, hi, n)]

    @torch.inference_mode()
    def serve(self, backbone, question: str, image, budget_ms: float):
        """Answer one request; returns (Generation with the chosen knobs, controller overhead in ms)."""
        t0 = time.perf_counter()
        budget_ms = float(budget_ms)
        if self.calibration is not None:  # decide for the budget as the profile's machine would see it
            budget_ms = self.calibration.profiled_budget(budget_ms)
            budget_ms = round(budget_ms, 1)  # few distinct budgets for the kernel's per-budget cache
        lang = self.questions.get(question)
        if lang is None:
            lang = remember(self.questions, question, self.question_cache,
                            self.kernel.language(*language_sum(backbone, question, self.embeddings)))
        size = image_size_features([image.size])[0] if self.policy.n_input else None
        group = size_class(*image.size) if self.group_by == "size" else None
        tier_i, ins_i = self.kernel.stage1(lang, budget_ms, size, group)
        space = self.policy.space
        p = space.insertions[ins_i]
        options = space.num_blocks_options(p)
        query = None
        if self.policy.budget_token is not None:
            query = self.queries.get(budget_ms)
            if query is None:
                query = remember(self.queries, budget_ms, 4096, self.policy.budget_query(
                    torch.tensor([budget_ms])).to(backbone.device, backbone.model.dtype))
        stage1_ms = (time.perf_counter() - t0) * 1e3

        def stage2(token, prompt):
            token = as_numpy(token)[0]
            if self.policy.n_counts:
                token = np.concatenate([token, token_count_features(prompt.vision_tokens[0], prompt.text_tokens[0])])
            k, n = self.kernel.stage2(token, budget_ms, tier_i, ins_i, len(options), group)
            return space.top_ks[k], options[n]

        knobs = Knobs(space.tiers[tier_i], p, max(space.top_ks), space.num_layers)
        gen = backbone.generate([image], [question], knobs, decide=stage2, query=query)
        self.decided_for = budget_ms
        return gen, stage1_ms + gen.stage2_ms

    def observe(self, knobs: Knobs, latency_ms: float, budget_ms: float) -> None:
        """Calibration's feedback after a served request (evaluate.serve calls it)."""
        if self.calibration is not None:
            profiled = self.profiled_latency(knobs)
            self.calibration.observe(profiled, latency_ms, budget_ms, predicted_to_fit=profiled <= self.decided_for)


def remember(cache: dict, key, limit: int, value):
    """cache[key] = value, the cache emptied first when it holds `limit` entries (0: not kept)."""
    if limit:
        if len(cache) >= limit:
            cache.clear()
        cache[key] = value
    return value


def language_sum(backbone, question: str, table: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """grpo.env.language_features for one question as (sum of its input embeddings, token count),
    through the tokenizer's Rust backend if it has one; `table`: embedding_view(backbone), read
    without torch when there is one. The kernel divides by the count after its first matmul."""
    tok = backbone.tokenizer
    fast = getattr(tok, "backend_tokenizer", None)
    ids = (fast.encode(question, add_special_tokens=False).ids if fast is not None
           else tok(question, add_special_tokens=False)["input_ids"]) or [tok.pad_token_id or 0]
    if table is not None:
        return table.take(ids, 0).sum(0), len(ids)
    emb = backbone.model.get_input_embeddings().weight
    return emb[torch.tensor(ids, device=emb.device)].float().sum(0).cpu().numpy(), len(ids)


def embedding_view(backbone) -> np.ndarray | None:
    """The input embeddings as a numpy view (no copy) when they are float32 on the CPU, else None."""
    emb = backbone.model.get_input_embeddings().weight
    return emb.detach().numpy() if emb.device.type == "cpu" and emb.dtype == torch.float32 else None


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.device.type == "cpu" and t.dtype == torch.float32 else t.float().cpu().numpy()
