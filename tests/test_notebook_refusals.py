"""What the notebook API (``metaattn_viz.load``, ``route``, ``stream``, ``calibrate``) refuses,
and how it says so: in words naming what to do, never a bare ``AssertionError`` or an
``AttributeError`` from deep inside.

A stream whose model is detached between two tokens raises the error every entry point
raises after ``detach``; a model that is not a text causal LM (a base model without its LM
head, a vision-language model) is refused by name when loaded, and left as it was; a
``max_context`` too small for the new tokens is named as the limit; ``calibrate`` on a single
text is refused, since it would validate on its own training text.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import CharTokenizer, tiny_config, tiny_llava, tiny_model

import metaattn_viz as mav
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing.discovery import UnsupportedModel
from metaattn_viz.training import data as data_mod

DETACHED = "tiny: this RoutedModel was detached; route a new one"
TEXT = "The river ran past the mill and the town, quietly, for years on end, and nobody minded it. "


def _loaded():
    return mav.load((tiny_model(seed=3), CharTokenizer()), name="tiny")


# -- detaching -----------------------------------------------------------------------------------
def test_a_stream_detached_between_tokens_says_so():
    """Detached after its first token, a stream refuses its next one with RoutedModel's own
    detached error (it used to fail an ``assert`` with no message), and the model is back as
    it was."""
    routed = _loaded()
    stream = routed.stream("hello there", RoutingSettings(budget=0.3), max_new_tokens=6, max_context=64)
    prefill = next(stream)
    n_prompt = len(prefill.token_ids)
    assert len(next(stream).token_ids) == n_prompt + 1
    model = routed.detach()
    with pytest.raises(RuntimeError, match=DETACHED):
        next(stream)
    assert len(prefill.token_ids) == n_prompt + 1  # nothing unrouted was added to the trace
    assert model.config._attn_implementation != "metaattn"


def test_a_stream_detached_after_its_prefill_says_so():
    routed = _loaded()
    stream = routed.stream("hello there", RoutingSettings(budget=0.3), max_new_tokens=4, max_context=64)
    next(stream)
    routed.detach()
    with pytest.raises(RuntimeError, match=DETACHED):
        next(stream)


# -- models that are not text causal LMs ---------------------------------------------------------
def test_a_base_model_without_its_head_is_refused_when_loaded():
    torch.manual_seed(0)
    base = transformers.LlamaModel(tiny_config("llama")).eval()
    implementation = base.config._attn_implementation
    with pytest.raises(
        UnsupportedModel, match="LlamaModel has no language-model head.*load LlamaForCausalLM"
    ):
        mav.load((base, CharTokenizer()), name="base")
    assert base.config._attn_implementation == implementation  # left as it was


def test_a_vision_language_model_is_refused_when_loaded():
    """Refused by name, with the class to load its language model as, before anything reads
    a config field the composite config lacks (its hidden_size is its text_config's)."""
    model = tiny_llava()
    implementation = model.config._attn_implementation
    with pytest.raises(
        UnsupportedModel, match="LlavaForConditionalGeneration is a composite model.*LlamaForCausalLM"
    ):
        mav.load((model, CharTokenizer()), name="llava")
    assert model.config._attn_implementation == implementation


# -- the context ---------------------------------------------------------------------------------
def test_a_max_context_too_small_is_named_as_the_limit():
    routed = _loaded()
    with pytest.raises(
        ValueError,
        match=r"max_new_tokens \(3\) .* in max_context's 2-token context: .* or a larger max_context$",
    ):
        routed.route("hello there", max_new_tokens=3, max_context=2)
    with pytest.raises(
        ValueError,
        match=r"max_new_tokens \(1024\) .* in the model's 1024-token context: ask for fewer new tokens$",
    ):
        routed.route("hello there", max_new_tokens=1024)
    assert routed.route("hello there", max_new_tokens=2, max_context=5).n_prompt_tokens == 3  # truncated


# -- calibrating on too little text --------------------------------------------------------------
def test_calibrate_on_one_text_is_refused():
    """One text (one paragraph) would be both the training and the validation text."""
    routed = _loaded()
    fast = dict(steps=1, seq_len=8, val_windows=1, progress=False)
    match = r"holds only 1 article .* give at least 2.*article i goes to validation when i % 10 == 9"
    with pytest.raises(data_mod.DataError, match=match):
        mav.calibrate(routed, [TEXT * 2], **fast)


def test_two_texts_hold_one_out_for_validation(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text(f"{TEXT}one\n\n{TEXT}two\n", encoding="utf-8")
    split = data_mod.load_split(path)
    assert [a.strip() for a in split.train + split.validation] == [f"{TEXT}one", f"{TEXT}two"]
    assert len(split.validation) == 1  # the last one
    routed = _loaded()
    stack = mav.calibrate(
        routed, [TEXT + "one", TEXT + "two"], steps=1, seq_len=8, val_windows=1, progress=False
    )
    assert stack.meta["data"]["articles_train"] == stack.meta["data"]["articles_validation"] == 1


def test_a_single_article_file_is_refused_before_any_model_work(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(f" = Only = \n {TEXT}\n", encoding="utf-8")
    with pytest.raises(data_mod.DataError, match="holds only 1 article"):
        data_mod.load_split(path)


def test_a_heading_without_its_trailing_space_still_starts_an_article(tmp_path):
    """Editors drop trailing spaces: `` = A =`` starts an article as `` = A = `` does, so
    such a file of two articles is split, not refused as one."""
    path = tmp_path / "two.txt"
    path.write_text(" = A =\n short text\n = B =  \n more\n", encoding="utf-8")
    split = data_mod.load_split(path)
    assert split.train == [" = A =\n short text".strip()] and split.validation == ["= B =  \n more"]
