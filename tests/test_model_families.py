"""Any transformers causal LM that routes correctly is accepted; any other is refused by name.

Tiny random configs (3 layers, hidden 96, byte vocabulary) of Llama, Qwen2, Mistral without
a window, Phi-3 and GPT-2 route: budget 1.0 gives the dense model's logits, budget 0.5 routes
and streams, and `detach` gives the model back bit for bit with no hook left. Gemma 2
(sliding windows, soft-capping), a windowed Mistral, GPT-OSS (sink logits), BART's decoder
(cross-attention), an encoder-decoder, a base model without its LM head and a
vision-language model are refused, before anything on the model is changed, with a message
that names the feature (and, where there is one, what to load instead); so is a padded batch
at run time.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import CharTokenizer, routed_tiny, tiny_config, tiny_llava, tiny_model

from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import discovery
from metaattn_viz.routing.controller import ControllerStack, config_for_model
from metaattn_viz.routing.model import RoutedModel

ACCEPTED = ["llama", "qwen2", "mistral", "phi3", "gpt2"]


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _route(model, name: str) -> RoutedModel:
    ctrl = {k: ControllerStack(config_for_model(model.config, k), seed=0) for k in ("bayes", "priorfree")}
    return RoutedModel(model, CharTokenizer(), ctrl, name)


@pytest.mark.parametrize("arch", ACCEPTED)
def test_family_routes_and_detaches_exactly(arch):
    model = tiny_model(arch, seed=1)
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    implementation, hooks = model.config._attn_implementation, _hooks(model)
    routed = _route(model, f"tiny-{arch}")
    sites = discovery.attention_sites(model)
    assert [s.layer_idx for s in sites] == [0, 1, 2]
    assert (routed.prefill(ids, RoutingSettings(budget=1.0)).logits - before).abs().max() <= 1e-5
    half = routed.prefill(ids, RoutingSettings(budget=0.5))
    assert torch.isfinite(half.logits).all() and (half.logits - before).abs().max() > 0  # really routed
    trace = routed.route(ids[0].tolist(), RoutingSettings(budget=0.5), max_new_tokens=4)
    assert len(trace.token_ids) == 24 + 4 and trace.routes.shape == (3, 28)
    routed.detach()
    assert model.config._attn_implementation == implementation and _hooks(model) == hooks == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_gpt2_is_found_without_a_layers_attribute():
    """GPT-2 keeps its blocks in transformer.h and its attention in .attn: found through
    the attention interface, the block as the residual-stream holder."""
    model = tiny_model("gpt2")
    sites = discovery.attention_sites(model)
    assert [type(s.attention).__name__ for s in sites] == ["GPT2Attention"] * 3
    assert [s.block is model.transformer.h[i] for i, s in enumerate(sites)] == [True] * 3


def test_a_bfloat16_model_streams_on_the_cpu():
    """A model loaded in bfloat16 (transformers' default for many checkpoints) routes and
    streams on the CPU, through the torch decode path."""
    model = tiny_model("qwen2", seed=2).to(torch.bfloat16)
    routed = _route(model, "tiny-qwen2-bf16")
    assert routed.dtype == torch.bfloat16
    trace = routed.route("bfloat16 here", RoutingSettings(budget=0.5), max_new_tokens=6)
    assert len(trace.token_ids) - trace.n_prompt_tokens == 6


def _refused(model, match: str) -> None:
    implementation, hooks = model.config._attn_implementation, _hooks(model)
    with pytest.raises(discovery.UnsupportedModel, match=match) as err:
        _route(model, "refused")
    assert type(model).__name__ in str(err.value)
    assert model.config._attn_implementation == implementation and _hooks(model) == hooks  # untouched


def test_gemma2_is_refused_for_its_sliding_windows():
    _refused(tiny_model("gemma2"), r"sliding-window attention \(layer_types has sliding_attention")


def test_gemma2_without_windows_is_refused_for_soft_capping():
    model = tiny_model("gemma2", layer_types=["full_attention"] * 3, sliding_window=None)
    _refused(model, r"soft-capping \(attn_logit_softcapping=50")


def test_a_windowed_mistral_is_refused():
    _refused(
        tiny_model("mistral", sliding_window=16), r"sliding-window attention \(config.sliding_window=16\)"
    )


def test_sink_logits_are_refused():
    cfg = transformers.GptOssConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention"] * 2,
        sliding_window=None,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _refused(model, r"attention sink logits \(layer 0.sinks\)")


def _bart_config():
    return transformers.BartConfig(
        vocab_size=256,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
    )


def _untouched_refusal(model, match: str) -> None:
    """``check_supported`` refuses the model with `match`, naming its class, and the model
    is left as it was (for models whose config the controllers cannot be sized from)."""
    implementation, hooks = model.config._attn_implementation, _hooks(model)
    with pytest.raises(discovery.UnsupportedModel, match=match) as err:
        discovery.check_supported(model)
    assert type(model).__name__ in str(err.value)
    assert model.config._attn_implementation == implementation and _hooks(model) == hooks


def test_bart_decoder_is_refused_for_its_cross_attention():
    """BART's decoder as a causal LM keeps a cross-attention module (encoder_attn) beside its
    self-attention in every layer, with the same layer_idx: refused for the cross-attention,
    not for the duplicate index."""
    torch.manual_seed(0)
    model = transformers.BartForCausalLM(_bart_config()).eval()
    _untouched_refusal(model, r"has cross-attention \(layer 0's encoder_attn")


def test_an_encoder_decoder_model_is_refused_as_one():
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(_bart_config()).eval()
    _untouched_refusal(model, "is an encoder-decoder model")


def test_a_base_model_without_a_language_model_head_is_refused():
    """A bare LlamaModel gives hidden states, not logits: refused when routed, naming the
    class to load instead (it used to be routed and fail on its first pass)."""
    torch.manual_seed(0)
    _refused(
        transformers.LlamaModel(tiny_config("llama")).eval(), "no language-model head.*load LlamaForCausalLM"
    )


def test_a_vision_language_model_is_refused_naming_its_language_model():
    """LLaVA's config holds its language model's config (text_config) beside the vision
    encoder's: refused by ``check_causal_lm``, which reads nothing its top-level config
    lacks (no hidden_size there), so a loader can run it first."""
    model = tiny_llava()
    match = r"is a composite model \(LlavaConfig holds its language model's LlamaConfig.*as LlamaForCausalLM"
    with pytest.raises(discovery.UnsupportedModel, match=match):
        discovery.check_causal_lm(model)
    _untouched_refusal(model, match)


@pytest.mark.parametrize("arch", ACCEPTED)
def test_causal_lms_pass_the_causal_lm_check(arch):
    discovery.check_causal_lm(tiny_model(arch))


def test_a_padded_batch_is_refused_at_run_time():
    """Two sequences, the second left-padded: routing would ignore the padding, so the
    routed forward refuses it; the same batch unpadded routes."""
    routed = routed_tiny("llama")
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, :4] = 0
    with torch.no_grad(), routed.session(RoutingSettings(budget=0.5)):
        with pytest.raises(discovery.UnsupportedModel, match="padded batches are not supported"):
            routed.model(input_ids=ids, attention_mask=padded)
        routed.model(input_ids=ids, attention_mask=torch.ones_like(padded))


def test_a_padded_batch_outside_routing_is_the_dense_model():
    """Installed but outside a routing session the model keeps honouring its padding mask
    (transformers gets SDPA's masks for the routed implementation)."""
    routed = routed_tiny("llama", seed=3)
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        routed_out = routed.model(input_ids=ids, attention_mask=mask).logits
        routed.detach()
        plain = routed.model(input_ids=ids, attention_mask=mask).logits
    assert (routed_out[1, 3:] - plain[1, 3:]).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("mask", "plain"),
    [
        (None, True),
        (torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(), True),
        (torch.ones(1, 1, 3, 3, dtype=torch.bool), False),  # bidirectional
        (
            torch.zeros(1, 1, 3, 3).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf")),
            True,
        ),
        (torch.ones(1, 1, 1, 5, dtype=torch.bool), True),  # a decode step sees every key
    ],
)
def test_is_plain_causal(mask, plain):
    tq = 3 if mask is None else mask.shape[-2]
    assert discovery.is_plain_causal(mask, tq, 3 if tq == 3 else 5) is plain
