"""Shared fixtures: tiny random models of several families and the smoke texts, all offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: ``random:<model_type>`` overrides giving ~100k-parameter models of each family.
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=257, max_position_embeddings=256),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=257, n_positions=256),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=257,
                max_position_embeddings=256, word_embed_proj_dim=64),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=257, max_position_embeddings=256),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=257),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=257, max_position_embeddings=256),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=257, max_position_embeddings=256),
}


def tiny_model(family: str = "llama", dtype=torch.float32, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TINY[family]), dtype=dtype)
    model.config.use_cache = False
    return model.eval()


@pytest.fixture
def smoke_dir() -> Path:
    return SMOKE
