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


class CharTokenizer:
    """Enough of a tokenizer for tiny random models: ids are byte values."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", "replace")


def routed_tiny(arch="llama", seed=0, spread=1.0, **overrides):
    """A tiny model with untrained controllers; spread > 1 makes their posteriors vary more
    from token to token (untrained ones sit near the prior)."""
    import torch

    from metaattn_viz.controller import ControllerStack, config_for_model
    from metaattn_viz.routing import RoutedModel

    model = tiny_model(arch, seed=seed, **overrides)
    ctrl = {k: ControllerStack(config_for_model(model.config, k), seed=seed)
            for k in ("bayes", "priorfree")}
    with torch.no_grad():
        for stack in ctrl.values():
            for layer in stack.layers:
                layer.fc2.weight.mul_(spread)
    return RoutedModel(model, CharTokenizer(), ctrl, f"tiny-{arch}")


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct (cached conversion)."""
    from metaattn_viz import model_loading

    return model_loading.load()
