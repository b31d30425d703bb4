"""What differs between model families, in one place: one class per family, chosen from
`config.model_type`.

A family says how a tier maps to its processor's resolution setting, where the decoder blocks and
their routers live, which blocks may never be skipped, and what its vision encoder needs beyond the
processor's outputs. Everything else (positions, masks, deepstack, token types) is the model's own
forward, which `Backbone` calls with the vision features it computed and timed itself
(`mm_encoder_outputs`, as `generate` does).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from lvlm_ctrl.errors import UserError


def submodule(root: nn.Module, path: str) -> nn.Module | None:
    """root.a.b for path "a.b", or None where a part is missing."""
    for part in path.split("."):
        root = getattr(root, part, None)
    return root


class Family:
    model_types: tuple[str, ...] = ()
    processor_class = "AutoProcessor"
    tier_unit = "image side in pixels"
    prompt = "{question}\n<image>"

    def __init__(self, model: nn.Module, processor=None):
        self.model = model
        self.config = model.config
        self.processor = processor

    # ---- where the blocks and routers are ------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The text decoder: the module that owns the list of transformer blocks."""
        for path in ("model.language_model", "language_model", "model"):
            module = submodule(self.model, path)
            if module is not None and isinstance(getattr(module, "layers", None), nn.ModuleList):
                return module
        raise UserError(f"cannot find the decoder blocks of {type(self.model).__name__}: this family needs an "
                        "adapter in lvlm_ctrl/backbone/families.py")

    router_paths = ("mlp.gate", "mlp.router")

    def routers(self, block: nn.Module) -> list[nn.Module]:
        """The modules whose `top_k` attribute the block's MoE layers read at every call (none for a
        dense block; more than one where a block routes text and vision tokens apart)."""
        found = (submodule(block, path) for path in self.router_paths)
        return [m for m in found if m is not None and isinstance(getattr(m, "top_k", None), int)]

    def pinned_blocks(self) -> set[int]:
        """Blocks that stay whatever num_blocks says (block 0 always does: the KV cache reads the length there)."""
        return {0}

    # what a decoder's forward takes that the rollout engine gives a continuation itself
    continuation_own = frozenset({"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache",
                                  "past_key_values", "use_cache", "cache_position", "return_dict"})

    def continuation_kwargs(self, decoder_kwargs: dict, insertion: int, rows: torch.Tensor) -> dict | None:
        """What the decoder's forward needs, beside hidden states, mask and positions, to continue a
        prefill from block `insertion` on the batch's rows `rows` (repeats allowed), given what the model's
        forward passed it in that prefill (`decoder_kwargs`); None where the family cannot, and the
        rollout engine runs the configuration whole. By default: flags as they were, per-token
        inputs (batch x prompt length, e.g. token types) on those rows, and nothing else."""
        shape = decoder_kwargs["inputs_embeds"].shape[:2]
        out = {}
        for k, v in decoder_kwargs.items():
            if k in self.continuation_own or v is None:
                continue
            if isinstance(v, (bool, int, float, str)):
                out[k] = v
            elif isinstance(v, torch.Tensor) and v.shape[:2] == shape:
                out[k] = v[rows]
            else:
                return None
        return out

    # ---- preprocessing ---------------------------------------------------------------------------
    def tier_kwargs(self, value) -> dict:
        """The processor's keyword arguments that make an image cost tier `value`."""
        return {"size": {"height": int(value), "width": int(value)}}

    def vision_kwargs(self) -> dict:
        """Arguments of get_image_features beyond the processor's outputs."""
        return {}

    # why a knob of this family cannot be applied, said at load instead of ignoring the knob
    refused: str | None = None


class Llava(Family):
    """LLaVA-style wrappers, among them the embedded default (SigLIP tower + OLMoE decoder)."""

    model_types = ("llava",)
    processor_class = "LlavaProcessor"

    def vision_kwargs(self) -> dict:
        # a tier below the tower's native size needs its position embeddings interpolated
        return {"interpolate_pos_encoding": True}


class DynamicResolution(Family):
    """Qwen2-VL-style processors: an image is resized to a multiple of patch x merge pixels within
    [shortest_edge, longest_edge] pixels in all. The tier caps the vision tokens; an image gets as many
    as its size needs up to the cap."""

    tier_unit = "most vision tokens per image"

    def tier_kwargs(self, value) -> dict:
        ip = self.processor.image_processor
        pixels = int(value) * (ip.patch_size * ip.merge_size) ** 2
        return {"size": {"shortest_edge": min(ip.size["shortest_edge"], pixels), "longest_edge": pixels}}


class Qwen3VLMoe(DynamicResolution):
    """Qwen3-VL-MoE: dynamic resolution, multimodal rope positions, deepstack features added to the
    hidden states after the first few blocks (which therefore never move: they are pinned)."""

    model_types = ("qwen3_vl_moe",)
    processor_class = "Qwen3VLProcessor"
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"

    def pinned_blocks(self) -> set[int]:
        # the decoder adds deepstack feature i after its i-th block by loop index: skipping one of
        # these blocks would move a feature behind another block
        return {0, *range(len(self.config.vision_config.deepstack_visual_indexes))}

    def continuation_kwargs(self, decoder_kwargs: dict, insertion: int, rows: torch.Tensor) -> dict | None:
        # a continuation from block p starts with the pinned blocks p.. (its loop indices 0..): it adds
        # deepstack features p.., on its own rows' image tokens (the features are the image tokens
        # of all rows, row after row; a row may be asked for more than once)
        deepstack = ("visual_pos_masks", "deepstack_visual_embeds")
        out = super().continuation_kwargs({k: v for k, v in decoder_kwargs.items() if k not in deepstack},
                                          insertion, rows)
        mask, features = (decoder_kwargs.get(k) for k in deepstack)
        if out is None or features is None or insertion >= len(features):
            return out
        counts = mask.sum(-1)
        starts = torch.cumsum(counts, 0) - counts
        mine = torch.cat([torch.arange(int(starts[r]), int(starts[r] + counts[r]), device=mask.device)
                          for r in rows.tolist()])
        return {**out, "visual_pos_masks": mask[rows], "deepstack_visual_embeds": [f[mine] for f in features[insertion:]]}


class Glm4vMoe(DynamicResolution):
    """GLM-4.5V: dynamic resolution and multimodal rope like Qwen; its first blocks are dense
    (first_k_dense_replace): no router, and pinned."""

    model_types = ("glm4v_moe",)
    processor_class = "Glm4vProcessor"
    prompt = "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>{question}<|assistant|>\n"

    def pinned_blocks(self) -> set[int]:
        return {0, *range(self.config.text_config.first_k_dense_replace)}


class InternVL(Family):
    """InternVL (with a Qwen3-MoE language model for the MoE knobs): 448-pixel tiles; the tier is how
    many tiles an image may be cut into (plus a thumbnail when more than one)."""

    model_types = ("internvl",)
    processor_class = "InternVLProcessor"
    tier_unit = "most image tiles (max_patches)"
    prompt = "<|im_start|>user\n<IMG_CONTEXT>\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def tier_kwargs(self, value) -> dict:
        return {"crop_to_patches": True, "max_patches": int(value)}


class Aria(Family):
    """Aria: fixed-size crops (max_image_size 490 -> 128 vision tokens, 980 -> 256 in the released
    model); router at mlp.router; pixel_mask marks the padding of a non-square image."""

    model_types = ("aria",)
    processor_class = "AriaProcessor"
    tier_unit = "max_image_size in pixels (a key of the processor's size_conversion)"
    prompt = "<|im_start|>user\n<fim_prefix><|img|><fim_suffix>{question}<|im_end|>\n<|im_start|>assistant\n"

    def tier_kwargs(self, value) -> dict:
        sizes = sorted(self.processor.size_conversion)
        if int(value) not in sizes:
            raise UserError(f"Aria tier {value}: its projector knows max_image_size {sizes} only; "
                            f"set model.tiers to those values")
        return {"max_image_size": int(value)}


class Ernie45VLMoe(DynamicResolution):
    """ERNIE-4.5-VL-MoE: dynamic resolution (Qwen2-VL-style processor), multimodal rope, and two
    routed expert sets per block, one for text tokens and one for vision tokens: top_k applies to
    both. Its dense blocks (mlp_layer_types: the first) are pinned, as GLM-4.5V's."""

    model_types = ("ernie4_5_vl_moe",)
    processor_class = "Ernie4_5_VLMoeProcessor"
    router_paths = ("mlp.text_moe.gate", "mlp.vision_moe.gate")
    prompt = ("<|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>{question}\n"
              "Assistant: ")

    def pinned_blocks(self) -> set[int]:
        return {0, *(i for i, t in enumerate(self.config.text_config.mlp_layer_types) if t == "dense")}


class Llama4(Family):
    model_types = ("llama4",)
    refused = ("its experts run densely over every token (Llama4TextExperts multiplies all of them and zeroes "
               "the unrouted ones), so a smaller top_k saves no time")


class Gemma4(Family):
    model_types = ("gemma4",)
    refused = ("its router reads config.top_k_experts, one value shared by every block, at each call, so top_k "
               "cannot apply from the insertion point on only")


FAMILIES: list[type[Family]] = [Llava, Qwen3VLMoe, Glm4vMoe, InternVL, Aria, Ernie45VLMoe, Llama4, Gemma4]


def family_class(model_type: str) -> type[Family]:
    for cls in FAMILIES:
        if model_type in cls.model_types:
            if cls.refused:
                raise UserError(f"{model_type} is not supported: {cls.refused}")
            return cls
    known = ", ".join(t for cls in FAMILIES for t in cls.model_types if not cls.refused)
    raise UserError(f"model_type {model_type!r} has no adapter: supported are {known} "
                    "(add one in lvlm_ctrl/backbone/families.py)")


def image_only(processor_cls: type) -> type:
    """The family's processor without its video processor, whose class needs torchvision (no CPU wheel
    on PyPI): images only, which is all a VQA request has."""
    from transformers import ProcessorMixin

    if "video_processor" not in inspect.signature(processor_cls.__init__).parameters:
        return processor_cls

    class ImageOnly(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # ProcessorMixin takes as many sub-processors as this signature names: the video one is left out
            processor_cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=chat_template, **kwargs)
            self.video_processor = None

        def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
            # the base class's override may copy its video processor's files (ERNIE-4.5-VL: a font)
            return ProcessorMixin.save_pretrained(self, save_directory, push_to_hub=push_to_hub, **kwargs)

    # the base class's own arguments (InternVL's image_seq_length...), which save_pretrained keeps only
    # when __init__'s signature names them
    sig = inspect.signature(processor_cls.__init__)
    ImageOnly.__init__.__signature__ = sig.replace(
        parameters=[p for p in sig.parameters.values() if p.name != "video_processor"])
    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_cls.__name__
    return ImageOnly


def load_processor(root: Path, family: type[Family]):
    """Tokenizer + image processor (PIL backend when torchvision is missing) in the family's processor
    class; never a video processor, whether the checkpoint has one or not."""
    import json

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    base = getattr(transformers, family.processor_class)
    cls = image_only(base)
    image_processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    extra = {}
    config = root / "processor_config.json"
    if config.exists():
        params = inspect.signature(base.__init__).parameters
        extra = {k: v for k, v in json.loads(config.read_text()).items()
                 if k in params and k not in ("image_processor", "tokenizer", "video_processor")}
    return cls(image_processor=image_processor, tokenizer=tokenizer, **extra)
