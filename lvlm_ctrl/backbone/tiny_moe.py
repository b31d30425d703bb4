"""The embedded default backbone: a LLaVA-style VLM (SigLIP tower + OLMoE decoder) built from
transformers' own classes, small enough to train on a laptop CPU and to ship inside the package.

The decoder has OLMoE-1B-7B's shape where the knobs care (16 blocks, 64 experts, top-8 router) and
is otherwise tiny. The tokenizer is a word-level `tokenizers` model over the easy-VQA vocabulary.
"""

from __future__ import annotations

import re

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

PATCH_SIZE = 8
NATIVE_IMAGE_SIZE = 64  # easy-VQA images are 64x64; the high tier sees them as they are
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PROMPT = "{question}\n<image> answer :"  # question first: image tokens can attend to it


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for text in corpus + [PROMPT.format(question="")]:
        for w in words(text.replace("<image>", "")):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Punctuation splits off so "image?" and "image" share a token.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = SiglipImageProcessorPil(
        size={"height": NATIVE_IMAGE_SIZE, "width": NATIVE_IMAGE_SIZE},
        image_mean=[1.0, 1.0, 1.0],  # easy-VQA backgrounds are white: they map to 0, the shape stands out
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        image_token="<image>",
    )


def build_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, image_token_id: int,
                 hidden_size: int = 64, expert_size: int = 16, num_blocks: int = 16,
                 init_std: float = 0.02) -> LlavaConfig:
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=NATIVE_IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
    )
    text = OlmoeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=expert_size,
        num_hidden_layers=num_blocks, num_attention_heads=4, num_key_value_heads=4,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False,
        router_aux_loss_coef=0.01, initializer_range=init_std,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
    )


def build(corpus: list[str], seed: int = 0, **sizes) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised backbone and its processor (pretrain.py trains it)."""
    tokenizer = build_tokenizer(corpus)
    processor = build_processor(tokenizer)
    config = build_config(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<image>"), **sizes,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor
