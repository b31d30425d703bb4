"""The frozen backbone of a request: model, processor, knob hooks and the greedy decode loop.

`Backbone.generate` is the whole serving path of DESIGN.md: preprocess at the tier, vision encoder
and projector, prefill through the kept blocks (the latency token captured on the way), greedy
decode with the KV cache; each stage timed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache
from transformers.utils import logging as hf_logging

from lvlm_ctrl.backbone.hooks import KnobHooks
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.knobs import Knobs, KnobSpace

EMBEDDED = Path(__file__).resolve().parent.parent / "assets" / "tiny_moe"


@dataclass
class Generation:
    answers: list[str]
    output_tokens: list[int]
    vision_tokens: int
    text_tokens: list[int]
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    latency_token: torch.Tensor | None = None
    token_ids: list[list[int]] = field(default_factory=list)
    knobs: Knobs | None = None
    stage2_ms: float = 0.0  # the stage-2 decision, taken inside the prefill and not counted in it

    @property
    def total_ms(self) -> float:
        return self.vision_ms + self.prefill_ms + self.decode_ms


class Backbone:
    def __init__(self, model, processor, tiers: dict[str, int], ranking: list[int] | None,
                 prompt: str, max_new_tokens: int, name: str = "backbone"):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tier_sizes = dict(tiers)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.name = name
        self.hooks = KnobHooks(model, ranking)
        self.space = KnobSpace(tiers=tuple(self.tier_sizes), num_layers=self.hooks.num_layers)
        self.device = next(model.parameters()).device
        self.eos_id = self.tokenizer.eos_token_id
        self.image_token_id = model.config.image_token_id

    # ---- stages -------------------------------------------------------------------------
    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def encode(self, images: list[Image.Image], questions: list[str], tier: str):
        if tier not in self.tier_sizes:
            raise UserError(f"unknown tier {tier!r}: choose one of {', '.join(self.tier_sizes)}")
        side = self.tier_sizes[tier]
        texts = [self.prompt.format(question=q) for q in questions]
        enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True,
                             size={"height": side, "width": side})
        return enc.to(self.device)

    def embed(self, enc) -> torch.Tensor:
        """Vision tower + projector, merged into the text embeddings at the image placeholders."""
        features = self.model.model.get_image_features(
            enc["pixel_values"].to(self.model.dtype), interpolate_pos_encoding=True
        ).pooler_output
        embeds = self.model.get_input_embeddings()(enc["input_ids"])
        mask = (enc["input_ids"] == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(mask, torch.cat(list(features)).to(embeds.dtype))

    @staticmethod
    def positions(attention_mask: torch.Tensor) -> torch.Tensor:
        # Left padding: real tokens count from 0 so batch rows match batch-1 runs.
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    @torch.inference_mode()
    def generate(self, images, questions, knobs: Knobs, *, use_cache: bool = True,
                 stop_at_eos: bool = True, capture: bool = False,
                 max_new_tokens: int | None = None, kept: list[int] | None = None,
                 decide=None, query: torch.Tensor | None = None) -> Generation:
        """Greedy answers for a batch at `knobs`; `kept` overrides the block list (importance uses it).

        With `decide(latency_token) -> (top_k, num_blocks)`, only knobs.tier and knobs.insertion are
        fixed up front; stage 2 decides the rest after block p-1 of the same prefill. With a `query`
        (the budget token's embedding, (B, 1, d)), the latency token is that token's hidden state
        after block p-1, run behind the prompt (KnobHooks.probe) and counted as stage 2's time.
        """
        max_new = max_new_tokens or self.max_new_tokens
        t0 = self._now()
        enc = self.encode(images, questions, knobs.tier)
        embeds = self.embed(enc)
        attn = enc["attention_mask"]
        t1 = self._now()
        batch = embeds.shape[0]
        out_ids = torch.empty(batch, 0, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stage2_s = [0.0]
        if decide is not None:
            def timed(token):
                t = self._now()
                if query is not None:
                    layers = cache.layers[:knobs.insertion]
                    token = self.hooks.probe(query, [c.keys for c in layers], [c.values for c in layers],
                                             enc["attention_mask"], [knobs.insertion])[:, 0]
                out = decide(token)
                stage2_s[0] = self._now() - t
                return out
            blocks = self.hooks.staged(knobs.insertion, timed)
        elif kept is not None:
            blocks = self.hooks.run_blocks(kept)
        else:
            blocks = self.hooks.apply(knobs, capture=capture)
        with blocks as cap:
            cache = DynamicCache() if use_cache else None
            logits = self.model(inputs_embeds=embeds, attention_mask=attn, position_ids=self.positions(attn),
                                cache=cache, use_cache=use_cache, logits_to_keep=1).logits
            t2 = self._now()
            for step in range(max_new):
                nxt = logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
                out_ids = torch.cat([out_ids, nxt[:, None]], dim=1)
                done |= nxt == self.eos_id
                if step == max_new - 1 or (stop_at_eos and bool(done.all())):
                    break
                attn = torch.cat([attn, attn.new_ones(batch, 1)], dim=1)
                pos = self.positions(attn)
                if use_cache:
                    logits = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos[:, -1:],
                                        cache=cache, use_cache=True).logits
                else:
                    embeds = torch.cat([embeds, self.model.get_input_embeddings()(nxt[:, None])], dim=1)
                    logits = self.model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos,
                                        use_cache=False, logits_to_keep=1).logits
            t3 = self._now()
        token_ids, answers, n_out = [], [], []
        for row in out_ids.tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            token_ids.append(row[:cut])
            n_out.append(cut)
            answers.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        n_vision = int((enc["input_ids"][0] == self.image_token_id).sum())
        text = (enc["attention_mask"].sum(-1) - n_vision).tolist()
        if decide is not None:
            knobs = Knobs(knobs.tier, knobs.insertion, *cap.decision)
        return Generation(answers, n_out, n_vision, text, (t1 - t0) * 1e3, (t2 - t1 - stage2_s[0]) * 1e3,
                          (t3 - t2) * 1e3, cap.latency_token, token_ids, knobs, stage2_s[0] * 1e3)


def load_ranking(path: str | Path | None, num_layers: int) -> list[int] | None:
    if path is None or not Path(path).exists():
        return None
    try:
        ranking = json.loads(Path(path).read_text())["ranking"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"malformed importance file {path}: {err}; rerun python -m lvlm_ctrl.importance") from None
    if sorted(ranking) != list(range(num_layers)):
        raise UserError(f"importance file {path} does not rank blocks 0..{num_layers - 1}; "
                        "rerun python -m lvlm_ctrl.importance for this backbone")
    return ranking


def set_experts_implementation(model, name: str | None) -> None:
    """Pick the MoE experts kernel. Set on the text config (read at every forward) because
    from_pretrained(experts_implementation="grouped_mm") refuses LLaVA-style wrappers."""
    if name:
        model.config.get_text_config()._experts_implementation = name


def load_backbone(path: str | None = None, tiers: dict | None = None, importance: str | None = None,
                  prompt: str = "{question}", max_new_tokens: int = 8, device: str = "cpu",
                  dtype: str = "float32", experts_implementation: str | None = "batched_mm",
                  name: str | None = None) -> Backbone:
    """Load a backbone saved with save_pretrained from a local directory (never from a hub)."""
    root = Path(path) if path else EMBEDDED
    if not (root / "config.json").exists():
        raise UserError(f"no model checkpoint at {root}: pass model.path=DIR holding config.json and weights "
                        "(python -m lvlm_ctrl.pretrain writes one)")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForImageTextToText.from_pretrained(root, dtype=getattr(torch, dtype),
                                                            local_files_only=True).to(device)
        set_experts_implementation(model, experts_implementation)
        processor = AutoProcessor.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the backbone at {root}: {str(err).splitlines()[0]}") from None
    num_layers = len(KnobHooks(model).blocks)
    ranking = load_ranking(importance or root / "importance.json", num_layers)
    return Backbone(model, processor, tiers or {"high": 0}, ranking, prompt, max_new_tokens,
                    name=name or root.name)
