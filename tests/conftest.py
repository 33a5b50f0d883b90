"""Pytest set-up only: the environment every test runs in (offline, no analytics) and the
real bundled model for integration tests (loaded once per session, from the user's model
cache). Helpers that tests import (tiny models, attention inputs, the app server) live in
tests/helpers.py; test modules never import this file."""

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
