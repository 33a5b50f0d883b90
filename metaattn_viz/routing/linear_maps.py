"""The linear expert's learned feature maps as a model ships them, and which map a routing
setting selects (docs/method.md, Experts).

A model may ship one Hedgehog map per layer (metaattn_kernels.feature_maps.FeatureMap) in
assets/feature_maps/<model-slug>/: a safetensors file, keys layers.<i>.<tensor>, next to a
meta.json that records how they were distilled. This module is the one definition of that
format (`save`, `load`) and of where a model's maps live (`default_folder`), so that the
routed model can read them without importing the training code that writes them.

`load` refuses a folder without maps, or with a file it cannot read, with MapsUnavailable
(one line naming the file). `load_for_model` is lenient like the controllers' loader:
maps that are missing, unreadable or made for another model shape give None and a
reason, and the model still runs with elu + 1. `select` is the policy: "elu" needs
nothing, "learned" without maps is a ValueError that names the setting and says how to
make them.

Never: train maps (metaattn_viz.training.feature_maps does), apply them (the kernels do),
or decide routes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from metaattn_kernels.feature_maps import FeatureMap
from metaattn_viz import paths
from metaattn_viz.core.settings import LINEAR_MAPS

log = logging.getLogger(__name__)

WEIGHTS_FILE = "feature_maps.safetensors"
META_FILE = "meta.json"
TENSORS = ("q_weight", "q_bias", "k_weight", "k_bias")  # FeatureMap's fields, in order
TRAIN_COMMAND = "python -m metaattn_viz.training.feature_maps --data corpus/wikitext2/wiki.dev.raw"


class MapsUnavailable(ValueError):
    """No feature maps in a folder, or a maps file that cannot be read; the message names
    the file and says how to make them."""


def default_folder(model_slug: str) -> Path:
    """Where the shipped maps of a model live: assets/feature_maps/<model-slug>/."""
    return paths.FEATURE_MAPS_DIR / model_slug


def save(maps: list[FeatureMap], folder: Path, meta: dict) -> Path:
    """Write the maps (safetensors, keys layers.<i>.<tensor>) and meta.json into `folder`,
    both with the mode a new file gets (0666 less the umask). meta.json is strict JSON: a
    NaN or infinity in `meta` is a ValueError before anything is written."""
    from metaattn_viz.routing.tensor_files import save_tensors

    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"layers.{i}.{name}": getattr(fm, name).detach().float().contiguous()
        for i, fm in enumerate(maps)
        for name in TENSORS
    }
    save_tensors(tensors, folder / WEIGHTS_FILE)
    (folder / META_FILE).write_text(text)
    return folder


def load(folder: Path) -> list[FeatureMap]:
    """The per-layer FeatureMaps saved by `save` (float32, on the CPU); MapsUnavailable if
    the folder holds none, or a file that is not whole maps (truncated, another format)."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise MapsUnavailable(
            f"no feature maps in {folder} (expected {WEIGHTS_FILE}); train them with {TRAIN_COMMAND}"
        )
    try:
        tensors = load_file(str(path))
        n = 1 + max(int(key.split(".")[1]) for key in tensors)
        return [FeatureMap(*(tensors[f"layers.{i}.{name}"].float() for name in TENSORS)) for i in range(n)]
    except Exception as exc:  # the safetensors reader's errors, a missing tensor, a bad shape
        why = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
        raise MapsUnavailable(
            f"{path} is not a readable feature-maps file ({why}); train them again with {TRAIN_COMMAND}"
        ) from None


def load_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / META_FILE).read_text())


@dataclass(frozen=True)
class MapChoice:
    maps: list[FeatureMap] | None  # one per layer; None: this model has no usable learned maps
    source: str  # the folder they came from, or why there are none


def load_for_model(model_config, model_slug: str, folder: Path | None, head_dim: int) -> MapChoice:
    """The learned maps shipped for this model (`folder`, None: `default_folder`), or None
    with the reason when they are missing, unreadable or made for another model shape
    (`head_dim`: the model's, as its attention receives it, discovery.head_dim)."""
    folder = Path(folder) if folder else default_folder(model_slug)
    if not (folder / WEIGHTS_FILE).is_file():
        return MapChoice(None, f"no learned feature maps at {folder}")
    try:
        maps = load(folder)
    except Exception as exc:  # a corrupt file: the model still runs with elu + 1; say so
        reason = f"{folder}: unreadable ({type(exc).__name__}: {exc})"
        log.warning("%s; linear_map='learned' is unavailable", reason)
        return MapChoice(None, reason)
    hq, hkv = model_config.num_attention_heads, model_config.num_key_value_heads
    want = (model_config.num_hidden_layers, hq, hkv, head_dim)
    got = (len(maps), maps[0].q_heads, maps[0].kv_heads, maps[0].head_dim)
    if got != want or any((fm.q_heads, fm.kv_heads, fm.head_dim) != got[1:] for fm in maps):
        reason = (
            f"{folder}: made for another model shape (layers, query heads, kv heads, head dim "
            f"{got}, this model {want})"
        )
        log.warning("%s; linear_map='learned' is unavailable", reason)
        return MapChoice(None, reason)
    return MapChoice(maps, str(folder))


def place(maps: list[FeatureMap] | None, device: torch.device) -> list[FeatureMap] | None:
    """The maps on `device` (moved once here, not copied by every kernel call)."""
    return None if maps is None else [fm.to(device) for fm in maps]


def select(linear_map: str, maps: list[FeatureMap] | None, model_slug: str, source: str = "") -> list | None:
    """The per-layer feature maps a session with this `linear_map` setting uses: None for
    "elu" (elu + 1 in every kernel), the model's learned maps for "learned" (ValueError
    when it has none), and for "auto" the learned maps when there are some, else None."""
    if linear_map not in LINEAR_MAPS:
        raise ValueError(f"linear_map must be one of {', '.join(LINEAR_MAPS)}, got {linear_map!r}")
    if linear_map == "elu" or (linear_map == "auto" and maps is None):
        return None
    if maps is None:
        why = f" ({source})" if source else ""
        raise ValueError(
            f"linear_map='learned': no learned feature maps exist for {model_slug}{why}; "
            f"train them with `{TRAIN_COMMAND}`, or use linear_map='elu'"
        )
    return maps


def resolve(linear_map: str, maps: list[FeatureMap] | None) -> str:
    """The concrete name ("elu" or "learned") of the map `select` picks for this setting."""
    if linear_map not in LINEAR_MAPS:
        raise ValueError(f"linear_map must be one of {', '.join(LINEAR_MAPS)}, got {linear_map!r}")
    if linear_map == "auto":
        return "elu" if maps is None else "learned"
    return linear_map
