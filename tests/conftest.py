"""Shared fixtures: tiny random models for unit tests, the real bundled model for
integration tests (loaded once per session, from the user's model cache)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(arch: str = "llama", **overrides):
    """A tiny random causal-LM config with RoPE and grouped-query attention."""
    import transformers

    common = dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=1024, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides),
                                                          dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct (cached conversion)."""
    from metaattn_viz import model_loading

    return model_loading.load()
