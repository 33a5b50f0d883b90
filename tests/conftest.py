"""Shared fixtures: tiny random models for unit tests, the real bundled model for
integration tests (loaded once per session, from the user's model cache)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct (cached conversion)."""
    from metaattn_viz.routing import loading as model_loading

    return model_loading.load()
