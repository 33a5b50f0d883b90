"""Which weights a controller belongs to: a content fingerprint of a model's parameters.

Controllers are calibrated on one copy of a model's weights (the bundled Q4_1 GGUF,
dequantised to float32). Another copy of "the same" model (the hub's bfloat16 safetensors,
another quantisation) routes differently, so `meta.json` records the fingerprint of the
weights calibration saw, and loading compares it with the weights actually loaded
(docs/method.md, "Choices this project made"). Controllers calibrated for another model
altogether (meta.json's model name or architecture) are told apart from another copy of
the same model's weights (controllers_notice). Never changes the model.
"""

from __future__ import annotations

import hashlib
import re

import torch

FINGERPRINT_KIND = "blake2b-128/float32-state-dict/v1"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer of `model` (names, shapes and float32 values),
    independent of the device and of the dtype the weights are held in: the same numbers
    in bfloat16 and float32 hash alike only if their float32 values are equal."""
    h = hashlib.blake2b(digest_size=16)
    h.update(FINGERPRINT_KIND.encode())
    state = model.state_dict()
    seen: set[int] = set()
    for name in sorted(state):
        t = state[name]
        if t.data_ptr() in seen and t.numel():  # tied weights (embeddings): hash once
            h.update(f"{name}=tied".encode())
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}:{tuple(t.shape)}".encode())
        data = t.detach().to("cpu", torch.float32).contiguous()
        h.update(data.numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def fingerprint_notice(recorded: str | None, loaded: str) -> str | None:
    """The notice to show when the controllers were calibrated on other weights, else None.
    Controllers from before fingerprints were recorded say so too."""
    if recorded is None:
        return "these controllers do not record which weights they were calibrated on"
    if recorded != loaded:
        return "calibrated on another copy of these weights: routing may differ from docs/results.md"
    return None


# what a model's config says it is, recorded in meta.json ("architecture") beside the name:
# the same in every copy of a model's weights (a GGUF and the hub's safetensors alike)
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# how a copy of a model is named after the model: its format and quantisation (a GGUF's
# "-Q4_K_M", a repository's "-GGUF", "-bf16", "-AWQ"), taken off before names are compared
_COPY_SUFFIX = re.compile(
    r"(-(gguf|ggml|safetensors|onnx|mlx|awq|gptq|exl2|\d+bit|int\d+|u?fp\d+|bf16|f\d+|i?q\d+(-[a-z0-9]{1,3})*))+$"
)


def architecture(config) -> dict:
    """The model's kind and shape from its (text) config: ARCHITECTURE_KEYS that it has."""
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    values = {key: getattr(text, key, None) for key in ARCHITECTURE_KEYS}
    return {key: value for key, value in values.items() if isinstance(value, (str, int))}


def same_model_name(a: str, b: str) -> bool:
    """Whether two model names name one model: compared as slugs (case and punctuation aside,
    a hub id by its last part), with a copy's format or quantisation suffix taken off."""

    def base(name: str) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", name.strip().split("/")[-1].lower()).strip("-")
        return _COPY_SUFFIX.sub("", slug) or slug

    return base(a) == base(b)


def controllers_notice(meta: dict, loaded: str, name: str, config) -> str | None:
    """The notice for trained controllers (their ``meta``, meta.json) routing the weights
    fingerprinted ``loaded`` of the model ``name`` with ``config``, else None.

    Calibrated on these very weights: None. Calibrated for another model (meta.json's
    ``model`` names another, or its ``architecture`` differs from this model's, where both
    are recorded): said so, by name, since their routing is then at best that of controllers
    never trained for this model. Else another copy of the same model (another quantisation,
    another dtype; fingerprint_notice)."""
    recorded = meta.get("weights_fingerprint")
    if recorded == loaded:
        return None
    other = meta.get("model")
    other = other.strip() if isinstance(other, str) else ""
    was = meta.get("architecture")
    was = was if isinstance(was, dict) else {}
    now = architecture(config)
    differs = [k for k in ARCHITECTURE_KEYS if k in was and k in now and was[k] != now[k]]
    if differs:
        label = f"{other or 'another model'} ({', '.join(f'{k} {was[k]}' for k in differs)})"
        these = f"these weights ({', '.join(f'{k} {now[k]}' for k in differs)})"
    elif other and not same_model_name(other, name):
        label, these = other, f"these weights ({name})"
    else:  # the same model, as far as is recorded: another copy of its weights
        return fingerprint_notice(recorded, loaded)
    untrained = "routing is at best that of controllers untrained for this model"
    return f"calibrated for {label}, not {these}: {untrained}"
