"""The trained two-stage controller at serving time (evaluate, infer).

Stage 1 reads the question (the backbone's tokenizer and input embeddings) and the budget and picks
(tier, p) before the image is processed; stage 2 runs inside the serving prefill, after block p-1,
on the latency token, and picks (top_k, num_blocks). Decisions are the argmax (argmax_kernel.py).
The controller's own time (both stages) is reported as its overhead. Stage 1's question feature
(tokenizer, embeddings, first matmul) depends on the question string alone and is cached per string
(`question_cache` entries; 0 = off): VQA traffic repeats its questions, and each miss costs ~0.1 ms
of cold-cache tokenizing right after the previous request's forward pass.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from lvlm_ctrl.controllers.argmax_kernel import ArgmaxKernel
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.grpo.policy import TwoStagePolicy
from lvlm_ctrl.knobs import Knobs, KnobSpace


def load_policy(ckpt: str | Path) -> tuple[TwoStagePolicy, dict]:
    path = Path(str(ckpt))
    if not path.exists():
        raise UserError(f"checkpoint not found at {path}: train one with python -m lvlm_ctrl.train controller=grpo "
                        "(it writes <run>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        hp = ckpt["hyper_parameters"]
        if "blocks_per_top_k" not in hp and "space" in hp:
            raise UserError(f"{path} was trained by an older lvlm_ctrl whose num_blocks head ignores top_k: retrain "
                            "it with python -m lvlm_ctrl.train controller=grpo")
        space = KnobSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in hp["space"].items()})
        policy = TwoStagePolicy(space, d_model=hp["d_model"], budget_dim=hp["budget_dim"], hidden=hp["hidden"],
                                budget_token=hp.get("budget_token", False))
        state = {k[len("policy."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
        policy.load_state_dict(state)
    except (KeyError, RuntimeError, EOFError, TypeError) as err:
        raise UserError(f"{path} is not a GRPO controller checkpoint ({err.__class__.__name__}: {err}); "
                        "pass a checkpoint written by python -m lvlm_ctrl.train controller=grpo") from None
    return policy.eval(), hp


class GRPOController:
    name = "grpo"

    def __init__(self, ckpt: str | None = None, question_cache: int = 4096, speed_tracking: float = 0.0,
                 **_train_options):
        if isinstance(question_cache, bool) or not isinstance(question_cache, int) or question_cache < 0:
            raise UserError(f"controller.question_cache={question_cache!r}: give a number of entries >= 0 (0 = off)")
        if isinstance(speed_tracking, bool) or not isinstance(speed_tracking, (int, float)) or not 0 <= speed_tracking < 1:
            raise UserError(f"controller.speed_tracking={speed_tracking!r}: give an EWMA weight in [0, 1) (0 = off)")
        self.ckpt, self.question_cache, self.speed_tracking = ckpt, question_cache, speed_tracking
        self.log_speed = 0.0  # log(measured / profiled latency), EWMA over the requests served
        self.expected: np.ndarray | None = None  # the profile's latency per configuration (bind)
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
        self.kernel = ArgmaxKernel(self.policy, self.hparams["d_model"])
        self.questions.clear()  # another checkpoint's features
        self.queries.clear()
        self.embeddings = embedding_view(backbone)
        self.expected = None
        if self.speed_tracking:
            if "config_latency_ms" not in self.hparams:
                raise UserError(f"controller.speed_tracking needs a checkpoint that stores its profile's latency per "
                                f"configuration; {self.ckpt} does not: retrain it, or pass controller.speed_tracking=0")
            self.expected = np.array(self.hparams["config_latency_ms"], dtype=np.float64)
        self.log_speed = 0.0
        return self

    @property
    def speed(self) -> float:
        """How much slower (> 1) or faster this machine runs now than when the profile was measured,
        in 2% steps (so the kernel's per-budget cache sees few distinct budgets)."""
        return round(math.exp(self.log_speed) * 50) / 50

    def default_budgets(self, n: int) -> list[float]:
        lo, hi = self.hparams["feasible_ms"]
        return [float(b) for b in torch.linspace(lo, hi, n)]

    @torch.inference_mode()
    def serve(self, backbone, question: str, image, budget_ms: float):
        """Answer one request; returns (Generation with the chosen knobs, controller overhead in ms)."""
        t0 = time.perf_counter()
        budget_ms = float(budget_ms)
        if self.expected is not None:  # decide for the budget as the profile's machine would see it
            budget_ms /= self.speed
        lang = self.questions.get(question)
        if lang is None:
            lang = remember(self.questions, question, self.question_cache,
                            self.kernel.language(*language_sum(backbone, question, self.embeddings)))
        tier_i, ins_i = self.kernel.stage1(lang, budget_ms)
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

        picked = []

        def stage2(token):
            k, n = self.kernel.stage2(as_numpy(token)[0], budget_ms, tier_i, ins_i, len(options))
            picked.extend((k, n))
            return space.top_ks[k], options[n]

        knobs = Knobs(space.tiers[tier_i], p, max(space.top_ks), space.num_layers)
        gen = backbone.generate([image], [question], knobs, decide=stage2, query=query)
        if self.expected is not None:
            self.track_speed(gen.total_ms, self.expected[(tier_i, ins_i, *picked)])
        return gen, stage1_ms + gen.stage2_ms

    def track_speed(self, measured_ms: float, profiled_ms: float) -> None:
        """The machine's speed drifts (20-30% over minutes on the 2-core CI machine): a profile
        measured in a fast spell makes every budget near a configuration's latency late in a slow
        one. An EWMA of log(measured / profiled) over the served requests tracks the drift."""
        if measured_ms > 0 and profiled_ms > 0:
            ratio = min(max(math.log(measured_ms / profiled_ms), -0.7), 0.7)  # one odd request moves it little
            self.log_speed += self.speed_tracking * (ratio - self.log_speed)


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
