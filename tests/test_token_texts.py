"""What a token is labelled with (RoutedModel.token_texts, the maps' axis labels and the
trace's `tokens`), and which ids a prompt becomes (RoutedModel.encode)."""

from __future__ import annotations

import pytest
from helpers import CharTokenizer, routed_tiny

REPLACEMENT = "\ufffd"  # what a token holding only part of a character shows


@pytest.fixture
def byte_routed():
    """A tiny routed model whose tokens are UTF-8 bytes (CharTokenizer): every non-ASCII
    character is split over tokens, as byte-level BPE splits the characters it has not
    merged."""
    routed = routed_tiny()
    yield routed
    routed.detach()


def test_a_character_split_over_tokens_shows_whole_on_the_token_that_completes_it(byte_routed):
    ids = list("你好 a👋".encode())
    assert byte_routed.token_texts(ids) == [
        *[REPLACEMENT] * 2, "你", *[REPLACEMENT] * 2, "好", " ", "a", *[REPLACEMENT] * 3, "👋"
    ]  # fmt: skip
    # decoding each token alone (before): every byte of a character was U+FFFD
    assert "你" not in [byte_routed.tokenizer.decode([i]) for i in ids]


def test_a_stream_one_token_at_a_time_labels_as_the_whole_text(byte_routed):
    """A decode step hands over one token: the tokens before it complete its character."""
    ids = list("é… ok".encode())
    whole = byte_routed.token_texts(ids)
    stepwise = [byte_routed.token_texts([t], before=ids[:n])[0] for n, t in enumerate(ids)]
    assert stepwise == whole == [REPLACEMENT, "é", REPLACEMENT, REPLACEMENT, "…", " ", "o", "k"]


def test_a_trace_of_a_split_character_carries_the_readable_labels(byte_routed):
    trace = byte_routed.route("café", max_new_tokens=2)
    assert trace.tokens[: trace.n_prompt_tokens] == ["c", "a", "f", REPLACEMENT, "é"]


def test_real_tokenizer_labels_english_as_before_and_cjk_readably(real_model):
    from metaattn_viz.routing.model import RoutedModel

    tok = real_model.tokenizer
    with RoutedModel.from_loaded(real_model) as routed:
        english = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
        assert routed.token_texts(english) == [tok.decode([i]) for i in english]
        cjk = tok("你好，世界", add_special_tokens=False)["input_ids"]
        texts = routed.token_texts(cjk)
        assert "".join(texts).replace(REPLACEMENT, "") == "你好，世界"  # every character shown once
        assert all(t for t in texts)  # no empty label


def test_a_prompt_gets_the_special_tokens_its_tokenizer_adds(byte_routed):
    """encode encodes as `tokenizer(prompt)` does (a Llama tokenizer's BOS), so the trace is
    of the input model.generate(**tokenizer(prompt)) sees."""

    class WithBos(CharTokenizer):
        def __call__(self, text, add_special_tokens=True):
            ids = super().__call__(text)["input_ids"]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    byte_routed.tokenizer = WithBos()
    assert byte_routed.encode("ab") == [1, *CharTokenizer()("ab")["input_ids"]]
