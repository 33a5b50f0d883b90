"""What the notebook API (``metaattn_viz.load``, ``route``, ``stream``, ``calibrate``) refuses,
and how it says so: in words naming what to do, never a bare ``AssertionError`` or an
``AttributeError`` from deep inside.

A stream whose model is detached between two tokens raises the error every entry point
raises after ``detach``; a model that is not a text causal LM (a base model without its LM
head, a vision-language model) is refused by name when loaded, and left as it was; a
``max_context`` too small for the new tokens is named as the limit; ``calibrate`` on a single
text is refused, since it would validate on its own training text. A ControllerStack where a
trace needs its kind's name, a tokenizer with ids the model lacks, ``load`` arguments of the
wrong kind, and a checkpoint without weights the model needs (transformers' logging left as
it was) are refused by name; layer_types all full attention are not a sliding window.
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


# -- the controllers a trace names -----------------------------------------------------------------
def test_a_controller_stack_in_place_of_its_kind_name_is_refused():
    """A trace names its controllers by kind (its JSON record, a figure's title): the stack
    calibrate returns is refused by route, stream and reroute with the name to pass (it
    used to become the trace's `controller`, which then failed to_json)."""
    routed = _loaded()
    stack = routed.controllers["bayes"]
    said = (
        r"controller must be a controller kind name \('bayes', 'priorfree'\), got a ControllerStack: "
        r"pass controller='bayes'"
    )
    with pytest.raises(TypeError, match=said):
        routed.route("hello there", controller=stack)
    with pytest.raises(TypeError, match=said):
        next(routed.stream("hello there", controller=stack))  # type: ignore[arg-type]
    trace = routed.route("hello there", controller="bayes")
    with pytest.raises(TypeError, match=said):
        routed.reroute(trace, RoutingSettings(budget=0.3), controller=stack)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"controller must be a controller kind name .*got NoneType$"):
        routed.route("hello there", controller=None)
    assert routed.reroute(trace, RoutingSettings(budget=0.3)).controller == "bayes"


# -- a tokenizer that is not the model's ---------------------------------------------------------
class WideTokenizer(CharTokenizer):
    """A tokenizer of another model: 1,000 ids, its letters beyond a 256-id vocabulary."""

    def __len__(self):
        return 1000

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 300 if chr(b).isalpha() else b for b in text.encode("utf-8")]}


def test_a_tokenizer_whose_ids_the_model_lacks_is_named():
    """Its ids would fail with an IndexError deep in the embedding: said with both sizes."""
    routed = mav.load((tiny_model(), WideTokenizer()), name="tiny")
    with pytest.raises(
        ValueError,
        match=r"the tokenizer does not fit the model: it encoded the prompt to token id 416, but the "
        r"model's vocabulary has 256 ids, the tokenizer's 1000; pass the model's own tokenizer",
    ):
        routed.route("hello there")
    assert routed.route("12 34").n_tokens == 5  # its ids that fit still route


# -- load's arguments ------------------------------------------------------------------------------
def test_load_refuses_arguments_of_the_wrong_kind_by_name(tmp_path):
    pair = (tiny_model(), CharTokenizer())
    with pytest.raises(TypeError, match="name must be a string .*got int"):
        mav.load(pair, name=123)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"controllers must be a folder path \(a str or os.PathLike\), got int"
    ):
        mav.load(pair, controllers=123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="controllers must name a folder, got an empty path"):
        mav.load(pair, controllers="")
    # the docs say None is the bundled model; an empty path is a mistake, not that
    with pytest.raises(
        ValueError, match=r"model is an empty path: .*leave model out \(None\) for the bundled"
    ):
        mav.load("")
    assert pair[0].config._attn_implementation != "metaattn"  # none of them routed it


# -- checkpoints without weights the model needs ---------------------------------------------------
def _checkpoint(folder, model, drop=()):
    """``model`` saved to ``folder`` as save_pretrained does, less the weights in ``drop``,
    with a tokenizer (so that a load gets as far as it would with a real one)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(exist_ok=True)
    model.config.save_pretrained(folder)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(folder)
    return folder


def test_a_checkpoint_without_weights_is_refused_and_transformers_logging_is_left_alone(tmp_path):
    """A base model's checkpoint (no lm_head) or a partial one loaded silently with random
    weights, and muted transformers for the rest of the session: now each is refused naming
    the weights, and transformers' verbosity is what it was."""
    torch.manual_seed(0)
    base = _checkpoint(tmp_path / "base", transformers.LlamaModel(tiny_config("llama")).eval())
    partial = _checkpoint(tmp_path / "partial", tiny_model(), drop=("model.layers.1.mlp.up_proj.weight",))
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    try:
        with pytest.raises(
            ValueError,
            match=r"base has no language-model head \(lm_head.weight not among its weights: a base "
            r"model's checkpoint, .*: load a LlamaForCausalLM checkpoint, one saved with its head",
        ):
            mav.load(base)
        with pytest.raises(
            ValueError, match=r"partial lacks weights the model needs \(model.layers.1.mlp.up_proj.weight\)"
        ):
            mav.load(str(partial))
        assert transformers.logging.get_verbosity() == transformers.logging.INFO
    finally:
        transformers.logging.set_verbosity(before)


def test_missing_weights_are_named_a_few_at_a_time():
    from metaattn_viz.routing.loading import NAMED_WEIGHTS, missing_weights

    model = tiny_model()
    keys = [f"model.layers.0.w{i}" for i in range(NAMED_WEIGHTS + 3)]
    said = missing_weights(model, {"missing_keys": set(keys)}, "here")
    assert said is not None and said.startswith("here lacks weights the model needs (model.layers.0.w0, ")
    assert "3 more)" in said
    assert missing_weights(model, {"missing_keys": set(), "mismatched_keys": []}, "here") is None


# -- sliding windows ---------------------------------------------------------------------------------
def test_layer_types_all_full_attention_are_not_taken_for_a_sliding_window():
    """A Gemma 3 config made all full attention keeps a sliding_window that no layer uses (its
    layers hold their own window: None): it routes. Mistral's layers read the config's window
    whatever its layer_types: still refused."""
    common = {
        k: v
        for k, v in tiny_config("llama").to_dict().items()
        if k
        in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
    }
    full = ["full_attention"] * common["num_hidden_layers"]
    torch.manual_seed(0)
    gemma3 = transformers.AutoModelForCausalLM.from_config(
        transformers.Gemma3TextConfig(**common, layer_types=full, attn_logit_softcapping=None)
    ).eval()
    assert gemma3.config.sliding_window
    with mav.load((gemma3, CharTokenizer()), name="gemma3") as routed:
        assert routed.route("hello there", budget=0.3).n_tokens == 11
    mistral = transformers.AutoModelForCausalLM.from_config(
        transformers.MistralConfig(**common, layer_types=full, sliding_window=64)
    ).eval()
    with pytest.raises(UnsupportedModel, match=r"sliding-window attention \(config.sliding_window=64\)"):
        mav.load((mistral, CharTokenizer()), name="mistral")
