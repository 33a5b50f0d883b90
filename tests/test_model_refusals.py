"""Models and controllers routing cannot use, refused by name where they are handed over,
never an error from deep inside torch or the kernels.

A controller stack put in ``routed.controllers`` by hand (as ``controller_kind``'s own
message suggests), or handed to a pass, that was made for another model shape (layers,
d_model, head counts) or is of another kind is refused when it is used, with the one shape
check ``load_for_model`` falls back to untrained controllers on (``shape_problem``); it used
to fail with an IndexError or a matmul's shapes. DeepSeek's multi-head latent attention
whose value head dim differs from its query/key head dim is refused at load (it used to fail
on any routed budget in the kernels' argument check), and where the two agree the routed
model's head dim is the one the attention receives, not the config's ``head_dim`` (the rotary
part alone). A model without attention (Mamba) is refused as one before anything reads its
config (it used to be an AttributeError), and a hybrid (Qwen3-Next) by its other layers.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from helpers import CharTokenizer, tiny_config, tiny_model

import metaattn_viz as mav
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import discovery
from metaattn_viz.routing.controller import ControllerStack, config_for_model, load_for_model, shape_problem
from metaattn_viz.routing.discovery import UnsupportedModel
from metaattn_viz.routing.model import RoutedModel

PROMPT = "The river ran past the mill"


def _loaded() -> RoutedModel:
    """A tiny Llama (3 layers, hidden 96, 6 query / 2 kv heads of 16) through the notebook API."""
    return mav.load((tiny_model(seed=3), CharTokenizer()), name="tiny")


def _stack(kind: str = "bayes", features=("base",), **shape) -> ControllerStack:
    return ControllerStack(config_for_model(tiny_config(**shape), kind, features), seed=0)


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# -- controllers of another shape ------------------------------------------------------------------
MISFITS = [
    ({"num_hidden_layers": 2}, ("base",), "2 layers where the model has 3"),
    ({"hidden_size": 48}, ("base",), "d_model 48 where the model's hidden size is 96"),
    (
        {"num_key_value_heads": 3},
        ("base", "attention"),
        "6 query / 3 kv heads where the model has 6 / 2",
    ),
]


@pytest.mark.parametrize(("shape", "features", "said"), MISFITS)
def test_a_stack_installed_by_hand_for_another_shape_is_refused_by_name(shape, features, said):
    """Installed under its kind and routed by name: refused naming the slot and the mismatch
    (it used to be an IndexError in torch's ModuleList, or a matmul's shapes)."""
    routed = _loaded()
    routed.controllers["bayes"] = _stack(features=features, **shape)
    match = rf"routed.controllers\['bayes'\] does not fit this model: {said}\. Install"
    with pytest.raises(ValueError, match=match):
        routed.route(PROMPT, budget=0.3, max_new_tokens=2)
    with pytest.raises(ValueError, match=match):
        routed.prefill(torch.tensor([list(range(3, 20))]), RoutingSettings(budget=0.3))
    assert routed.route(PROMPT, budget=0.3, controller="priorfree").n_tokens == len(PROMPT)
    routed.detach()


def test_a_stack_handed_to_a_pass_for_another_shape_is_refused():
    routed = _loaded()
    ids = torch.tensor([list(range(3, 20))])
    with pytest.raises(ValueError, match=r"the controller stack does not fit this model: 2 layers"):
        routed.prefill(ids, RoutingSettings(budget=0.3), _stack(num_hidden_layers=2))
    fits = _stack()
    assert routed.prefill(ids, RoutingSettings(budget=0.3), fits).logits.shape[:2] == (1, 17)


def test_a_stack_of_another_kind_or_not_a_stack_in_a_slot_is_refused():
    """A prior-free stack under "bayes" would route as a point estimate in traces that say
    "bayes"; something that is no stack at all would fail on an attribute."""
    routed = _loaded()
    routed.controllers["bayes"] = _stack("priorfree")
    other_kind = r"\['bayes'\] does not fit this model: it is a priorfree stack, not bayes\."
    with pytest.raises(ValueError, match=other_kind):
        routed.route(PROMPT, budget=0.3)
    routed.controllers["bayes"] = "controllers/my-model"  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"routed.controllers\['bayes'\] must be a ControllerStack, got str"):
        routed.route(PROMPT, budget=0.3)


def test_load_for_model_falls_back_on_the_same_shape_check(tmp_path, caplog):
    stack = _stack(num_hidden_layers=2)
    stack.save(tmp_path / "bayes")
    config = tiny_config()
    assert shape_problem(stack.config, config) == "2 layers where the model has 3"
    assert shape_problem(_stack().config, config) is None
    with caplog.at_level(logging.WARNING):
        choice = load_for_model(config, "tiny", "bayes", tmp_path / "bayes")
    assert choice.source == "untrained" and not choice.stack.trained
    said = "made for another model shape (2 layers where the model has 3)"
    assert choice.notes == [f"{tmp_path / 'bayes'}: {said}"]


# -- multi-head latent attention -------------------------------------------------------------------
def _deepseek_v3(v_head_dim: int):
    """Tiny DeepSeek-V3 (MLA): queries and keys of head dim 8 + 8 = 16, its config's head_dim
    the rotary part alone (8)."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=v_head_dim,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=2,
        moe_intermediate_size=32,
    )
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(cfg).eval()


def test_latent_attention_with_another_value_head_dim_is_refused_at_load():
    """It used to load, then fail on any routed budget with the kernels' "k and v must have
    the same shape"."""
    model = _deepseek_v3(v_head_dim=8)
    implementation, hooks = model.config._attn_implementation, _hooks(model)
    match = (
        r"DeepseekV3ForCausalLM has a value head dim other than its query/key head dim "
        r"\(layer 0: values of head dim 8, queries and keys of 16; .*v_head_dim != qk_head_dim\)"
    )
    with pytest.raises(UnsupportedModel, match=match):
        mav.load((model, CharTokenizer()), name="mla")
    assert model.config._attn_implementation == implementation and _hooks(model) == hooks


def test_latent_attention_routes_with_the_head_dim_its_attention_receives():
    """v_head_dim == qk_head_dim == 16 routes; the head dim of the "flops" cost model and of
    the trace is 16, not config.head_dim (8, the rotary part)."""
    model = _deepseek_v3(v_head_dim=16)
    assert model.config.head_dim == 8
    ids = torch.tensor([list(range(3, 19))])
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    routed = mav.load((model, CharTokenizer()), name="mla16")
    assert routed.head_dim == 16
    assert (routed.prefill(ids, RoutingSettings(budget=1.0)).logits - dense).abs().max() <= 1e-5
    trace = routed.route(PROMPT, budget=0.5, cost_model="flops")
    assert trace.head_dim == 16 and trace.n_tokens == len(PROMPT)
    with routed.session(RoutingSettings(budget=0.5, cost_model="flops")) as sess:
        assert sess.routing.costs.head_dim == 16
    routed.detach()


def test_learned_maps_for_latent_attention_are_judged_by_the_head_dim_it_receives(tmp_path):
    """Feature maps of head dim 16 fit the MLA model above (its config's head_dim says 8):
    one definition of the head dim, the attention's own (discovery.head_dim)."""
    from helpers import random_maps

    from metaattn_viz.routing import linear_maps, loading

    model = _deepseek_v3(v_head_dim=16)
    linear_maps.save(random_maps(n_layers=2, hq=4, hkv=4, d=16), tmp_path / "maps", {"kind": "hedgehog"})
    loaded = loading.LoadedModel(
        model, CharTokenizer(), loading.ModelSource("config", "-", "mla16"), 0.0, "config"
    )
    routed = RoutedModel.from_loaded(loaded, feature_maps_dir=tmp_path / "maps")
    assert routed.feature_maps is not None and routed.feature_maps_source == str(tmp_path / "maps")
    routed.detach()


def test_layers_of_different_head_dims_are_refused():
    model = tiny_model()
    model.model.layers[1].self_attn.head_dim = 8
    said = r"LlamaForCausalLM has layers of different head dims \(8, 16\): routing does not honour it"
    with pytest.raises(UnsupportedModel, match=said):
        discovery.check_supported(model)


# -- models without attention in every layer ---------------------------------------------------------
def test_a_model_without_attention_is_refused_as_one(caplog):
    """Mamba: refused before the controllers are sized (no "untrained controllers" warning
    first), and by RoutedModel itself, where it used to be an AttributeError on the
    config's num_attention_heads."""
    cfg = transformers.MambaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2)
    model = transformers.MambaForCausalLM(cfg).eval()
    said = r"MambaForCausalLM: no attention module calls transformers' attention interface"
    with caplog.at_level(logging.WARNING), pytest.raises(UnsupportedModel, match=said):
        mav.load((model, CharTokenizer()), name="mamba")
    assert "UNTRAINED" not in caplog.text
    with pytest.raises(UnsupportedModel, match=said):
        RoutedModel(model, CharTokenizer(), {}, "mamba")
    assert all(not m.training for m in model.modules())


def test_a_hybrid_model_is_refused_naming_its_other_layers():
    """Qwen3-Next: linear attention (gated DeltaNet) in three layers of four; the message
    names them, where it used to blame layer_idx counting."""
    cfg = transformers.Qwen3NextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    )
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    match = (
        r"Qwen3NextForCausalLM is a hybrid model: attention through transformers' attention interface "
        r"\(ALL_ATTENTION_FUNCTIONS\) is in layer 3 only; layers 0, 1, 2 of its 4 mix tokens "
        r"otherwise \(linear_attention, per config.layer_types\)"
    )
    with pytest.raises(UnsupportedModel, match=match):
        mav.load((model, CharTokenizer()), name="qwen3-next")
