"""Tiny random checkpoints of real MoE VLM families, built from transformers' own classes, for tests
and for trying the pipeline on a family without downloading anything:

    python -m lvlm_ctrl.backbone.build_tiny qwen3_vl_moe outputs/models/tiny_qwen3_vl_moe

Each has the family's architecture at toy width (16 decoder blocks, 64 experts, top-8, like the
embedded default), a byte-level tokenizer built with `tokenizers` carrying the family's special
tokens, and the family's image processor (PIL backend; no video processor, no torchvision). The
weights are random: answers are noise, but every knob acts on the real model code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lvlm_ctrl.backbone.families import image_only
from lvlm_ctrl.errors import UserError, cli
from lvlm_ctrl.io import check_writable

QWEN_SPECIALS = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "image_token": "<|image_pad|>",
                 "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
                 "vision_end_token": "<|vision_end|>"}


def byte_tokenizer(specials: dict[str, str], extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Every byte one token (no merges), plus the family's special tokens: any text encodes."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(dict.fromkeys([*specials.values(), *extra])))
    named = {k: v for k, v in specials.items() if k in ("pad_token", "eos_token", "bos_token", "unk_token")}
    others = {k: v for k, v in specials.items() if k not in named}
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", extra_special_tokens=others, **named)


def word_tokenizer(specials: dict[str, str], words: list[str], extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """One token per word of `words` (lower-cased, punctuation split off), plus the family's special
    tokens: a trained tiny model answers in words, and an answer of n words is n + 1 decode steps."""
    tokens = list(dict.fromkeys([*specials.values(), *extra, "<unk>", *words, "?", ",", ".", ":"]))
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(list(dict.fromkeys([*specials.values(), *extra])))
    named = {k: v for k, v in specials.items() if k in ("pad_token", "eos_token", "bos_token", "unk_token")}
    others = {k: v for k, v in specials.items() if k not in named}
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", unk_token="<unk>",
                                   extra_special_tokens=others, **named)


def qwen3_vl_moe(seed: int = 0, num_blocks: int = 16, experts: int = 64, top_k: int = 8,
                 text_shape: dict | None = None, vision_shape: dict | None = None, words: list[str] | None = None):
    """text_shape / vision_shape override the tiny sizes (experiments/gpu_qwen3_vl_30b.py: the 30B-A3B
    shape); with `words`, a word-level tokenizer over them (pretrain_vlm.py: the synth-VQA testbed)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    extra = ("<|im_start|>",)
    tokenizer = word_tokenizer(QWEN_SPECIALS, [*words, "user", "assistant"], extra) if words else \
        byte_tokenizer(QWEN_SPECIALS, extra)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in QWEN_SPECIALS.items()}
    patch, merge = 16, 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        size=vision_token_range(patch, merge))
    processor = image_only(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=num_blocks,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=16,
                num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"], tie_word_embeddings=False)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=[1, 2, 3])
    text.update(text_shape or {})
    vision.update(vision_shape or {})
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=ids["image_token"],
                              video_token_id=ids["video_token"], vision_start_token_id=ids["vision_start_token"],
                              vision_end_token_id=ids["vision_end_token"], pad_token_id=ids["pad_token"],
                              eos_token_id=ids["eos_token"])
    if words:  # to be trained (pretrain_vlm.py): the family's own initialisation
        torch.manual_seed(seed)
        return Qwen3VLMoeForConditionalGeneration(config), processor
    return random_model(Qwen3VLMoeForConditionalGeneration, config, seed), processor


def aria(seed: int = 0, num_blocks: int = 16, experts: int = 64, top_k: int = 8):
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaProcessor
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    specials = {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "<|im_end|>", "image_token": "<|img|>"}
    tokenizer = byte_tokenizer(specials, ("<|im_start|>", "<fim_prefix>", "<fim_suffix>"))
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in specials.items()}
    # 70-pixel patches: 490 -> 7x7 patches -> 16 vision tokens, 980 -> 14x14 -> 32 (the released model:
    # 14-pixel patches, 128 and 256 tokens)
    image_processor = AriaImageProcessorPil(max_image_size=980, min_image_size=490, split_image=False)
    processor = AriaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              size_conversion={490: 16, 980: 32})
    vision = dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=980, patch_size=70)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=16, num_hidden_layers=num_blocks,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=experts, moe_topk=top_k,
                moe_num_shared_experts=1, max_position_embeddings=4096, pad_token_id=ids["pad_token"],
                bos_token_id=None, eos_token_id=ids["eos_token"])
    config = AriaConfig(vision_config=vision, text_config=text, projector_patch_to_query_dict={49: 16, 196: 32},
                        image_token_index=ids["image_token"], pad_token_id=ids["pad_token"],
                        eos_token_id=ids["eos_token"])
    return random_model(AriaForConditionalGeneration, config, seed), processor


def glm4v_moe(seed: int = 0, num_blocks: int = 16, experts: int = 64, top_k: int = 8):
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration, Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    specials = {"pad_token": "<|endoftext|>", "eos_token": "<|user|>", "image_token": "<|image|>",
                "video_token": "<|video|>"}
    tokenizer = byte_tokenizer(specials, ("[gMASK]", "<sop>", "<|assistant|>", "<|begin_of_image|>",
                                          "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"))
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in specials.items()}
    tid = tokenizer.convert_tokens_to_ids
    patch, merge = 16, 2
    image_processor = Glm4vImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        size=vision_token_range(patch, merge))
    processor = image_only(Glm4vProcessor)(image_processor=image_processor, tokenizer=tokenizer)
    # 2 heads of 32: partial rotary (0.5) leaves 8 frequencies for the 3 rope sections
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=num_blocks,
                num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=16, n_routed_experts=experts,
                num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "partial_rotary_factor": 0.5},
                pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch, image_size=64,
                  spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=64)
    config = Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=ids["image_token"],
                            video_token_id=ids["video_token"], image_start_token_id=tid("<|begin_of_image|>"),
                            image_end_token_id=tid("<|end_of_image|>"), video_start_token_id=tid("<|begin_of_video|>"),
                            video_end_token_id=tid("<|end_of_video|>"), pad_token_id=ids["pad_token"],
                            eos_token_id=ids["eos_token"])
    return random_model(Glm4vMoeForConditionalGeneration, config, seed), processor


def internvl(seed: int = 0, num_blocks: int = 16, experts: int = 64, top_k: int = 8):
    """InternVL with a Qwen3-MoE language model (InternVL3.5's MoE variants)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "start_image_token": "<img>",
                "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tokenizer = byte_tokenizer(specials, ("<|im_start|>",))
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in specials.items()}
    tile, patch = 64, 16  # 4x4 patches per tile, pixel-shuffled by 0.5: 4 vision tokens per tile
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=False,
                                               min_patches=1, max_patches=12)
    processor = image_only(InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                              image_seq_length=4)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[tile, tile], patch_size=[patch, patch])
    text = dict(model_type="qwen3_moe", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                num_hidden_layers=num_blocks, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                moe_intermediate_size=16, num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=4096,
                pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"], tie_word_embeddings=False)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["context_image_token"],
                            image_seq_length=4, pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"],
                            tie_word_embeddings=False)
    return random_model(InternVLForConditionalGeneration, config, seed), processor


def ernie4_5_vl_moe(seed: int = 0, num_blocks: int = 16, experts: int = 64, top_k: int = 8):
    """ERNIE-4.5-VL-MoE: text and vision tokens routed to separate expert sets in every sparse block."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration, Ernie4_5_VLMoeProcessor
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil)

    specials = {"pad_token": "<unk>", "eos_token": "</s>", "bos_token": "<|begin_of_sentence|>",
                "image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
                "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
                "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}
    tokenizer = byte_tokenizer(specials)
    tid = tokenizer.convert_tokens_to_ids
    patch, merge = 14, 2
    image_processor = Ernie4_5_VLMoeImageProcessorPil(
        patch_size=patch, merge_size=merge,
        size=vision_token_range(patch, merge))
    processor = image_only(Ernie4_5_VLMoeProcessor)(image_processor=image_processor, tokenizer=tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=num_blocks,
                num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=[16, 16], moe_num_experts=experts,
                moe_k=top_k, moe_num_shared_experts=1, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
                pad_token_id=tid(specials["pad_token"]), eos_token_id=tid(specials["eos_token"]),
                bos_token_id=tid(specials["bos_token"]), tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_merge_size=2)
    config = Ernie4_5_VLMoeConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        **{f"{k}_id": tid(v) for k, v in specials.items() if k.startswith(("image", "video"))})
    return random_model(Ernie4_5_VLMoeForConditionalGeneration, config, seed), processor


def vision_token_range(patch: int, merge: int) -> dict:
    """A dynamic-resolution image processor's `size`: from 4 to 256 vision tokens per image."""
    pixels = (patch * merge) ** 2
    return {"shortest_edge": pixels * 4, "longest_edge": pixels * 256}


def random_model(model_cls, config, seed: int):
    """The family's model with random weights wide enough that routers disagree between tokens and
    logits between configurations (at the default init every expert scores alike and a changed knob
    barely moves an answer)."""
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 if name.endswith("gate.weight") else 0.1)
    return model


BUILDERS = {"qwen3_vl_moe": qwen3_vl_moe, "glm4v_moe": glm4v_moe, "internvl": internvl, "aria": aria,
            "ernie4_5_vl_moe": ernie4_5_vl_moe}


def build(family: str, out: str | Path, seed: int = 0) -> Path:
    if family not in BUILDERS:
        raise UserError(f"no tiny builder for {family!r}: choose one of {', '.join(BUILDERS)}")
    from transformers.utils import logging as hf_logging

    out = check_writable(out)
    hf_logging.disable_progress_bar()
    model, processor = BUILDERS[family](seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lvlm_ctrl.backbone.build_tiny", description=__doc__.splitlines()[0])
    ap.add_argument("family", help=f"one of {', '.join(BUILDERS)}")
    ap.add_argument("out", help="the directory to write the checkpoint into")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(f"wrote a tiny random {a.family} checkpoint to {build(a.family, a.out, a.seed)}")


if __name__ == "__main__":
    main()
