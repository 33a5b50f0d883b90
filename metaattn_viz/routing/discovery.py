"""Which models route, and where their attention layers are.

Routing plugs into what transformers itself exposes: an attention module is one that carries
an integer ``layer_idx`` and calls the attention interface (its class's ``forward`` looks the
function up in ``ALL_ATTENTION_FUNCTIONS``, so setting the model's attention implementation
reaches it), and its decoder layer is the module that holds it (that layer's input is the
residual stream the controller reads). No attribute path such as
``get_decoder().layers[i].self_attn`` is assumed, so Llama, Qwen2, Mistral, Phi-3 and GPT-2
are found alike.

A model whose attention needs what routing does not honour is refused before anything is
changed, with an ``UnsupportedModel`` error that names the model class and the feature:
sliding-window layers, logit soft-capping, attention sinks, non-causal or cross-attention,
values of another head dim than the queries and keys (multi-head latent attention with
``v_head_dim`` != ``qk_head_dim``), layers of different head dims, or attention outside the
interface (a model without attention, such as Mamba, or a hybrid whose other layers mix
tokens otherwise, such as Qwen3-Next's linear-attention layers). ``head_dim`` is the head dim
the attention function receives (the attention modules' own, not the config's
``head_dim``, which is the rotary part alone in DeepSeek's MLA). So is a model that is not a text causal LM
(``check_causal_lm``, which reads nothing but the model's config and head, so a loader can
call it before anything else reads the config): a composite model such as a
vision-language one, an encoder-decoder model, or a base model without its
language-model head. The same features are refused again at run time if
they reach the attention function anyway (``check_call``), and so is an attention mask that
is not plain causal (a padded batch): wrong results never pass silently.

Never: change the model (``install`` in routing/session.py does, after this has passed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

INTERFACE_NAME = "ALL_ATTENTION_FUNCTIONS"


class UnsupportedModel(ValueError):
    """A model (or a call) routing cannot honour; the message names the feature."""


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer: its index, the attention module and the decoder layer holding it."""

    layer_idx: int
    attention: torch.nn.Module
    block: torch.nn.Module


_INTERFACE_CALLERS: dict[type, bool] = {}  # class -> whether its forward calls the interface


def _calls_interface(cls: type) -> bool:
    """Whether `cls.forward` looks its attention function up in transformers' interface."""
    if cls not in _INTERFACE_CALLERS:
        try:
            source = inspect.getsource(getattr(cls, "forward"))  # noqa: B009 (any module class)
        except (OSError, TypeError, AttributeError):
            source = ""
        _INTERFACE_CALLERS[cls] = INTERFACE_NAME in source
    return _INTERFACE_CALLERS[cls]


def _model_name(model) -> str:
    return type(model).__name__


# how a decoder layer names its cross-attention module (BERT's crossattention, BART's,
# Whisper's and Marian's encoder_attn, T5's EncDecAttention), for classes that do not say
# so with an ``is_cross_attention`` attribute
_CROSS_ATTENTION_NAMES = ("cross", "encoder_attn", "encdec", "enc_dec")


def _causal_lm_class(config) -> str:
    """The name of transformers' causal-LM class for this config's model type (e.g.
    "LlamaForCausalLM"), else a description of it."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover (transformers moved it)
        return "its ...ForCausalLM class"
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None) or "")
    return name if isinstance(name, str) else "its ...ForCausalLM class"


def check_causal_lm(model) -> None:
    """Refuse, with ``UnsupportedModel`` saying what to load instead, a model that is not a
    text causal LM: a composite model (its config holds the language model's config beside
    other parts', e.g. a vision-language model), an encoder-decoder model, or a model
    without a language-model head (a base model gives hidden states, not next-token
    logits). Reads only the config and the head, so it can run before anything else reads
    the config (``check_supported`` runs it first too)."""
    name = _model_name(model)
    cfg = model.config
    get_text_config = getattr(cfg, "get_text_config", None)
    text_cfg = get_text_config() if callable(get_text_config) else cfg
    if text_cfg is not cfg:
        raise UnsupportedModel(
            f"{name} is a composite model ({type(cfg).__name__} holds its language model's "
            f"{type(text_cfg).__name__} beside other parts, e.g. a vision encoder): routing takes "
            f"a text causal LM; load its language model alone as {_causal_lm_class(text_cfg)} "
            "(from the text config and the language model's weights) and pass that"
        )
    if getattr(cfg, "is_encoder_decoder", False) is True:
        raise UnsupportedModel(
            f"{name} is an encoder-decoder model (its decoder attends to an encoder's states): "
            "routing takes a decoder-only causal LM"
        )
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head) and get_head() is None:
        raise UnsupportedModel(
            f"{name} has no language-model head (a base model: it gives hidden states, not "
            f"next-token logits): load {_causal_lm_class(cfg)} instead (AutoModelForCausalLM "
            "loads it from a checkpoint saved with its head)"
        )


def _is_cross_attention(module, attribute: str) -> bool:
    """Whether an attention module attends to another sequence (an encoder's) rather than
    to its own: it says so, or its decoder layer holds it under a cross-attention name."""
    if getattr(module, "is_cross_attention", False):
        return True
    return any(word in attribute.lower() for word in _CROSS_ATTENTION_NAMES)


def attention_sites(model) -> list[AttentionSite]:
    """The model's attention layers in layer order (refuses a model where they cannot be
    found through the attention interface, one per layer)."""
    parents: dict[int, tuple[torch.nn.Module, str]] = {}  # module -> its parent, the name it has there
    for parent in model.modules():
        for attribute, child in parent.named_children():
            parents.setdefault(id(child), (parent, attribute))
    found: dict[int, AttentionSite] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, bool) or not isinstance(idx, int) or not _calls_interface(type(module)):
            continue
        block, attribute = parents[id(module)]
        if _is_cross_attention(module, attribute):
            raise UnsupportedModel(
                f"{_model_name(model)} has cross-attention (layer {idx}'s {attribute} attends to an "
                "encoder's states): routing handles causal self-attention only; use a decoder-only "
                "causal LM"
            )
        if idx in found:
            raise UnsupportedModel(
                f"{_model_name(model)}: two attention modules claim layer_idx {idx}; "
                "routing needs one per layer"
            )
        found[idx] = AttentionSite(idx, module, block)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not found:
        raise UnsupportedModel(
            f"{_model_name(model)}: no attention module calls transformers' attention interface "
            f"({INTERFACE_NAME}) with a layer_idx, so routing cannot reach its attention"
        )
    if isinstance(n_layers, int) and set(found) < set(range(n_layers)):  # a hybrid
        raise UnsupportedModel(_hybrid_message(model, sorted(found), n_layers))
    if sorted(found) != list(range(len(found))) or (n_layers is not None and len(found) != n_layers):
        raise UnsupportedModel(
            f"{_model_name(model)}: attention modules with layer_idx {sorted(found)} found through "
            f"the interface, but the config has {n_layers} layers (layer_idx must count them from 0)"
        )
    return [found[i] for i in range(len(found))]


def _layer_list(indices: list[int]) -> str:
    """Layer indices in words: "layer 3", "layers 0, 1, 2", at most eight named."""
    shown = ", ".join(str(i) for i in indices[:8]) + (", ..." if len(indices) > 8 else "")
    return f"layer{'s' if len(indices) > 1 else ''} {shown}"


def _hybrid_message(model, attention: list[int], n_layers: int) -> str:
    """Why a model whose attention through the interface is in some of its layers only is
    refused: the other layers named, with what its config's ``layer_types`` calls them
    (Qwen3-Next's "linear_attention")."""
    others = sorted(set(range(n_layers)) - set(attention))
    types = getattr(model.config, "layer_types", None)
    kinds = ""
    if isinstance(types, (list, tuple)) and len(types) == n_layers:
        kinds = f" ({', '.join(sorted({str(types[i]) for i in others}))}, per config.layer_types)"
    return (
        f"{_model_name(model)} is a hybrid model: attention through transformers' attention "
        f"interface ({INTERFACE_NAME}) is in {_layer_list(attention)} only; {_layer_list(others)} "
        f"of its {n_layers} mix tokens otherwise{kinds}. Routing chooses an attention expert in "
        "every layer, so it takes models whose every layer is attention"
    )


def head_dims(site: AttentionSite, config) -> tuple[int | None, int | None]:
    """(query/key head dim, value head dim) of an attention layer: those its module shapes
    the tensors it hands the attention function with, its own ``qk_head_dim`` (multi-head
    latent attention's, whose config's ``head_dim`` is the rotary part alone) or
    ``head_dim``, and ``v_head_dim`` (else the query/key one); a module naming neither, the
    config's ``head_dim`` or hidden size / heads. None where nothing says."""

    def whole(value) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    module = site.attention
    qk = whole(getattr(module, "qk_head_dim", None)) or whole(getattr(module, "head_dim", None))
    if qk is None:
        heads = whole(getattr(config, "num_attention_heads", None))
        hidden = whole(getattr(config, "hidden_size", None))
        qk = whole(getattr(config, "head_dim", None)) or (hidden // heads if hidden and heads else None)
    return qk, whole(getattr(module, "v_head_dim", None)) or qk


def head_dim(model, sites: list[AttentionSite]) -> int:
    """The head dim of the queries and keys the model's attention function receives (the
    "flops" cost model's and the trace's ``head_dim``); ``check_supported`` has refused
    models whose layers differ in it or whose values have another."""
    qk, _ = head_dims(sites[0], model.config)
    if qk is None:
        raise UnsupportedModel(
            f"{_model_name(model)}: neither its attention modules (head_dim) nor its config "
            "(head_dim, hidden_size / num_attention_heads) say its attention head dim"
        )
    return qk


def _head_dim_problem(model, sites: list[AttentionSite]) -> str | None:
    """Where the head dims a model's attention function receives are not what routing's
    experts take (one head dim for queries, keys and values, the same in every layer): what
    the model has, said after its name, or None."""
    dims = [head_dims(site, model.config) for site in sites]
    for site, (qk, v) in zip(sites, dims, strict=True):
        if qk is not None and v != qk:
            return (
                f"has a value head dim other than its query/key head dim (layer {site.layer_idx}: "
                f"values of head dim {v}, queries and keys of {qk}; in multi-head latent attention, "
                "v_head_dim != qk_head_dim): routing does not honour it (its experts take keys and "
                "values of one head dim)"
            )
    sizes = sorted({qk for qk, _ in dims if qk is not None})
    if len(sizes) > 1:
        return (
            f"has layers of different head dims ({', '.join(map(str, sizes))}): routing does not "
            "honour it (it and its cost model take one head dim for every layer)"
        )
    return None


def _sliding_window(model, sites: list[AttentionSite]) -> Any:
    """Where the model attends through a sliding window, or None: its ``layer_types``, an
    attention module's ``sliding_window``, else the config's ``sliding_window`` where
    ``use_sliding_window`` does not turn it off. Not that last where the ``layer_types`` are
    all full attention and every attention module holds its own window (None: a Gemma 3
    config made all full attention keeps a ``sliding_window`` no layer uses); a module
    without one reads the config's window itself (Mistral's, whatever its layer_types)."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or []
    if "sliding_attention" in types:
        window = getattr(cfg, "sliding_window", None)
        return f"layer_types has sliding_attention layers (sliding_window={window})"
    for site in sites:
        window = getattr(site.attention, "sliding_window", None)
        if window:
            return f"layer {site.layer_idx} has sliding_window={window}"
    per_layer = bool(types) and all(hasattr(site.attention, "sliding_window") for site in sites)
    window = getattr(cfg, "sliding_window", None)
    if window and not per_layer and getattr(cfg, "use_sliding_window", True):
        return f"config.sliding_window={window}"
    return None


def check_supported(model) -> list[AttentionSite]:
    """The model's attention sites, or ``UnsupportedModel`` naming the first feature
    routing does not honour (a model that is not a text causal LM first: ``check_causal_lm``)."""
    name = _model_name(model)
    check_causal_lm(model)
    sites = attention_sites(model)
    cfg = model.config
    window = _sliding_window(model, sites)
    if window:
        raise UnsupportedModel(
            f"{name} uses sliding-window attention ({window}); routing does not honour it "
            "(its local expert has its own window and sinks)"
        )
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if softcap:
        raise UnsupportedModel(
            f"{name} uses attention logit soft-capping (attn_logit_softcapping={softcap}); "
            "routing does not honour it"
        )
    for site in sites:
        if getattr(site.attention, "sinks", None) is not None:
            raise UnsupportedModel(
                f"{name} uses attention sink logits (layer {site.layer_idx}.sinks); "
                "routing does not honour them"
            )
        if getattr(site.attention, "is_causal", True) is False:
            raise UnsupportedModel(
                f"{name} has non-causal attention (layer {site.layer_idx}); "
                "routing handles causal attention only"
            )
    dims = _head_dim_problem(model, sites)
    if dims:
        raise UnsupportedModel(f"{name} {dims}")
    return sites


def check_call(module, attention_mask, kwargs: dict) -> None:
    """Refuse, at run time, what reached the attention function that routing would drop:
    a sliding window, soft-capping or sink logits passed by the layer."""
    name = type(module).__name__
    if kwargs.get("sliding_window"):
        raise UnsupportedModel(
            f"{name} passed sliding_window={kwargs['sliding_window']}: routing does not honour it"
        )
    if kwargs.get("softcap"):
        raise UnsupportedModel(
            f"{name} passed softcap={kwargs['softcap']}: routing does not honour soft-capping"
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise UnsupportedModel(f"{name} passed attention sink logits: routing does not honour them")


def is_plain_causal(mask: torch.Tensor | None, tq: int, tk: int) -> bool:
    """Whether an attention mask ([B, 1 or H, Tq, Tk]; boolean: True = attend, or additive:
    0 = attend) lets every query see exactly the keys up to its own position: no padding,
    no window, nothing else. None is plain causal."""
    if mask is None:
        return True
    if mask.dim() != 4 or mask.shape[-2] != tq or mask.shape[-1] < tk:
        return False
    allowed = mask[..., :tk] if mask.dtype == torch.bool else mask[..., :tk] == 0
    q_pos = torch.arange(tk - tq, tk, device=mask.device).view(-1, 1)
    causal = torch.arange(tk, device=mask.device).view(1, -1) <= q_pos
    return bool((allowed == causal).all())
