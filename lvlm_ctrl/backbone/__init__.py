"""The frozen backbone of a request: model, processor, knob hooks and the greedy decode loop.

`Backbone.generate` is the whole serving path of DESIGN.md: preprocess at the tier (`encode`), the
vision encoder and projector (`vision`), the prefill through the kept blocks (`prefill`: the model's
own forward, given the vision features, so that its positions, masks and deepstack are the model's;
the latency token captured on the way), greedy decode with the KV cache; each stage timed. Profile,
evaluate, infer, importance and the GRPO features all go through these three steps.
"""

from __future__ import annotations

import inspect
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, DynamicCache
from transformers.utils import logging as hf_logging

from lvlm_ctrl.backbone.families import Family, family_class, load_processor
from lvlm_ctrl.backbone.hooks import KnobHooks
from lvlm_ctrl.errors import UserError
from lvlm_ctrl.knobs import Knobs, KnobSpace

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = ASSETS / "tiny_moe"  # the default; assets/tiny_qwen3_vl_moe is the synth-VQA testbed's


@dataclass
class Generation:
    answers: list[str]
    output_tokens: list[int]
    vision_tokens: list[int]
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


@dataclass
class Prompt:
    """A batch of requests preprocessed at one tier: what the model's own forward takes."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor   # as generate computes them: (B, L), or (rows, B, L) for multimodal rope
    vision_inputs: dict          # get_image_features' arguments (pixel_values, image_grid_thw, ...)
    forward_kwargs: dict         # whatever else the forward takes (e.g. mm_token_type_ids)
    vision_tokens: list[int]

    @property
    def next_position(self) -> torch.Tensor:
        """The position of the token after the prompt (generate's rule: the last one plus one)."""
        return self.position_ids[..., -1:] + 1

    @property
    def text_tokens(self) -> list[int]:
        return [int(n) - v for n, v in zip(self.attention_mask.sum(-1).tolist(), self.vision_tokens)]


class Backbone:
    def __init__(self, model, processor, tiers: dict[str, int], ranking: list[int] | None,
                 prompt: str | None, max_new_tokens: int, name: str = "backbone",
                 insertions: list[int] | None = None, top_ks: list[int] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family: Family = family_class(model.config.model_type)(model, processor)
        self.tier_sizes = dict(tiers)
        self.prompt = prompt or self.family.prompt
        self.max_new_tokens = max_new_tokens
        self.name = name
        self.hooks = KnobHooks(model, ranking, self.family)
        self.space = KnobSpace.for_backbone(tuple(self.tier_sizes), self.hooks, insertions, top_ks)
        self.device = next(model.parameters()).device
        self.eos_id = self.tokenizer.eos_token_id
        self.image_token_id = getattr(model.config, "image_token_id", None) or processor.image_token_id
        encoder = self.model.base_model.get_image_features
        self._vision_params = set(inspect.signature(encoder).parameters) - {"kwargs"}

    # ---- stages -------------------------------------------------------------------------
    def _now(self):
        """A point in time: a recorded CUDA event on a GPU (no synchronisation mid-request), else the clock."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _ms(self, start, end) -> float:
        if self.device.type == "cuda":
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def preprocess(self, images: list[Image.Image], questions: list[str], tier: str):
        """The processor's outputs at the tier, as a user of the model would pass them to its forward."""
        if tier not in self.tier_sizes:
            raise UserError(f"unknown tier {tier!r}: choose one of {', '.join(self.tier_sizes)}")
        texts = [self.prompt.format(question=q) for q in questions]
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True,
                              **self.family.tier_kwargs(self.tier_sizes[tier])).to(self.device)

    def encode(self, images: list[Image.Image], questions: list[str], tier: str) -> Prompt:
        kwargs = dict(self.preprocess(images, questions, tier))
        input_ids = kwargs.pop("input_ids")
        positions = self.model._prepare_position_ids_for_generation(input_ids, {"input_ids": input_ids, **kwargs})
        # split as generate does: what the vision encoder takes, and the rest for the forward
        vision = {k: kwargs.pop(k) for k in list(kwargs) if k in self._vision_params}
        for k, v in vision.items():
            if k.startswith("pixel_values") and v.is_floating_point():
                vision[k] = v.to(self.model.dtype)
        attention_mask = kwargs.pop("attention_mask")
        n_vision = (input_ids == self.image_token_id).sum(-1).tolist()
        return Prompt(input_ids, attention_mask, positions, vision, kwargs, n_vision)

    def vision(self, prompt: Prompt) -> dict:
        """The vision encoder and projector: the forward's `mm_encoder_outputs`."""
        out = self.model.base_model.get_image_features(**prompt.vision_inputs, **self.family.vision_kwargs(),
                                                       return_dict=True)
        return {"image": out}

    def prefill(self, prompt: Prompt, vision: dict, **kwargs):
        """The model's own forward over the prompt, given its vision features (cache, use_cache,
        logits_to_keep, output_hidden_states pass through)."""
        return self.model(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                          position_ids=prompt.position_ids, mm_encoder_outputs=dict(vision),
                          **prompt.forward_kwargs, **kwargs)

    @torch.inference_mode()
    def generate(self, images, questions, knobs: Knobs, *, use_cache: bool = True,
                 stop_at_eos: bool = True, capture: bool = False,
                 max_new_tokens: int | None = None, kept: list[int] | None = None,
                 decide=None, query: torch.Tensor | None = None) -> Generation:
        """Greedy answers for a batch at `knobs`; `kept` overrides the block list (importance uses it).

        With `decide(latency_token, prompt) -> (top_k, num_blocks)`, only knobs.tier and knobs.insertion
        are fixed up front; stage 2 decides the rest after block p-1 of the same prefill (the encoded
        `prompt` gives it the request's token counts). With a `query`
        (the budget token's embedding, (B, 1, d)), the latency token is that token's hidden state
        after block p-1, run behind the prompt (KnobHooks.probe) and counted as stage 2's time.
        """
        max_new = max_new_tokens or self.max_new_tokens
        t0 = self._now()
        prompt = self.encode(images, questions, knobs.tier)
        vision = self.vision(prompt)
        t1 = self._now()
        batch = prompt.input_ids.shape[0]
        stage2_ms = [0.0]
        cache = DynamicCache(config=self.model.config.get_text_config()) if use_cache else None
        if decide is not None:
            def timed(token):
                t = self._now()
                if query is not None:
                    layers = cache.layers[:knobs.insertion]
                    token = self.hooks.probe(query, [c.keys for c in layers], [c.values for c in layers],
                                             prompt.attention_mask, prompt.next_position, [knobs.insertion])[:, 0]
                out = decide(token, prompt)
                stage2_ms[0] = self._ms(t, self._now())
                return out
            blocks = self.hooks.staged(knobs.insertion, timed)
        elif kept is not None:
            blocks = self.hooks.run_blocks(kept)
        else:
            blocks = self.hooks.apply(knobs, capture=capture)
        with blocks as cap:
            logits = self.prefill(prompt, vision, cache=cache, use_cache=use_cache, logits_to_keep=1).logits
            t2 = self._now()
            if use_cache:
                step = self.cached_step(cache)
            else:  # the whole sequence again, as the model's forward would see it
                state = {"ids": prompt.input_ids, "extra": dict(prompt.forward_kwargs)}

                def step(nxt, attn, pos):
                    state["ids"] = torch.cat([state["ids"], nxt[:, None]], dim=1)
                    state["extra"] = {k: _grow(v, batch) for k, v in state["extra"].items()}
                    return self.model(input_ids=state["ids"], attention_mask=attn, position_ids=pos,
                                      mm_encoder_outputs=dict(vision), use_cache=False, logits_to_keep=1,
                                      **state["extra"]).logits
            out_ids = self.greedy(logits, prompt.attention_mask, prompt.position_ids, step, max_new, stop_at_eos)
            t3 = self._now()
        token_ids, answers, n_out = self.answers(out_ids)
        if decide is not None:
            knobs = Knobs(knobs.tier, knobs.insertion, *cap.decision)
        return Generation(answers, n_out, prompt.vision_tokens, prompt.text_tokens, self._ms(t0, t1),
                          self._ms(t1, t2) - stage2_ms[0], self._ms(t2, t3), cap.latency_token, token_ids, knobs,
                          stage2_ms[0])

    def cached_step(self, cache):
        """One decode step with the KV cache: step(next tokens, attention mask, positions) -> logits."""
        def step(nxt, attn, pos):
            return self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos[..., -1:],
                              cache=cache, use_cache=True).logits
        return step

    def greedy(self, logits, attention_mask, positions, step, max_new: int, stop_at_eos: bool = True,
               select=None) -> torch.Tensor:
        """Greedy decoding from the prefill's `logits`: (B, steps) token ids, a row that has ended
        its turn padded with EOS; `step(next, attention mask, positions) -> logits` runs the model.
        With `select(rows)`, the rows still decoding are all that later steps run: it is called
        with their indices among the rows of the last step when some have ended (to drop the others
        from the KV cache and whatever else `step` holds per row)."""
        batch = logits.shape[0]
        out_ids = torch.full((batch, max_new), self.eos_id, dtype=torch.long, device=logits.device)
        done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
        live = torch.arange(batch, device=logits.device)
        attn, pos = attention_mask, positions
        steps = 0
        for i in range(max_new):
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done[live], torch.full_like(nxt, self.eos_id), nxt)
            out_ids[live, i] = nxt
            steps = i + 1
            done[live] = done[live] | (nxt == self.eos_id)
            if i == max_new - 1 or (stop_at_eos and bool(done.all())):
                break
            if select is not None and bool(done[live].any()):
                stay = (~done[live]).nonzero()[:, 0]
                select(stay)
                live, nxt, attn, pos = live[stay], nxt[stay], attn[stay], pos[..., stay, :]
            attn = torch.cat([attn, attn.new_ones(len(live), 1)], dim=1)
            pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
            logits = step(nxt, attn, pos)
        return out_ids[:, :steps]

    def answers(self, out_ids: torch.Tensor) -> tuple[list[list[int]], list[str], list[int]]:
        """Each row's tokens through its end of turn, its text and its length."""
        token_ids, answers, n_out = [], [], []
        for row in out_ids.tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            token_ids.append(row[:cut])
            n_out.append(cut)
            answers.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return token_ids, answers, n_out


def _grow(value, batch: int):
    """A per-token forward input (token types) one generated text token longer."""
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == batch:
        return torch.cat([value, value.new_zeros(batch, 1)], dim=1)
    return value


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


@contextmanager
def experts_implementation(model, name: str):
    """The MoE experts kernel `name` inside the block, the model's own (the serving kernel, which
    requests are timed with) restored after it: batched answers run grouped_mm, the same answers
    and twice as fast in batches."""
    text_config = model.config.get_text_config()
    serving = getattr(text_config, "_experts_implementation", None)
    set_experts_implementation(model, name)
    try:
        yield
    finally:
        text_config._experts_implementation = serving


def backbone_dir(path: str | None = None, asset: str | None = None) -> Path:
    """Where a backbone's weights are: `path`, or the one shipped in lvlm_ctrl/assets/<asset>
    (tiny_moe, the embedded default, unless `asset` names another)."""
    return Path(path) if path else ASSETS / (asset or EMBEDDED.name)


def load_backbone(path: str | None = None, tiers: dict | None = None, importance: str | None = None,
                  prompt: str | None = None, max_new_tokens: int = 8, device: str = "cpu",
                  dtype: str = "float32", experts_implementation: str | None = "batched_mm",
                  name: str | None = None, insertions: list[int] | None = None,
                  top_ks: list[int] | None = None, device_map: str | dict | None = None,
                  asset: str | None = None) -> Backbone:
    """Load a backbone saved with save_pretrained from a local directory (never from a hub); its
    family (families.py) comes from config.model_type. prompt=None takes the family's template;
    device_map (e.g. "auto") spreads a model larger than one device over several (accelerate).
    path=None: a backbone shipped in lvlm_ctrl/assets/<asset> (tiny_moe, the embedded default, unless
    `asset` names another)."""
    root = backbone_dir(path, asset)
    if not (root / "config.json").exists():
        raise UserError(f"no model checkpoint at {root}: pass model.path=DIR holding config.json and weights "
                        "(python -m lvlm_ctrl.pretrain, python -m lvlm_ctrl.pretrain_vlm or python -m lvlm_ctrl.backbone.build_tiny "
                        "writes one)")
    hf_logging.disable_progress_bar()
    try:
        family = family_class(AutoConfig.from_pretrained(root, local_files_only=True).model_type)
        model = AutoModelForImageTextToText.from_pretrained(root, dtype=getattr(torch, dtype), local_files_only=True,
                                                            device_map=device_map)
        if device_map is None:
            model = model.to(device)
        set_experts_implementation(model, experts_implementation)
        processor = load_processor(root, family)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the backbone at {root}: {str(err).splitlines()[0]}") from None
    num_layers = len(family(model).decoder().layers)
    ranking = load_ranking(importance or root / "importance.json", num_layers)
    return Backbone(model, processor, tiers or {"high": 0}, ranking, prompt, max_new_tokens,
                    name=name or root.name, insertions=insertions, top_ks=top_ks)
