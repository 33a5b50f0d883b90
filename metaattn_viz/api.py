"""The notebook entry points: route a model in a few lines of Python and look at the result.

    import metaattn_viz as mav
    routed = mav.load()                      # or a folder, a GGUF file, a hub id, (model, tokenizer)
    trace = routed.route("The capital of France is", budget=0.3, max_new_tokens=16)
    trace.figure()                           # the routing maps; a notebook shows `trace` itself
    routed.detach()                          # the model as it was, bit for bit

    stack = mav.calibrate(routed, texts, steps=64, save="controllers/my-model")  # a model of your own
    routed = mav.load((model, tokenizer), controllers="controllers/my-model")   # later: loads them

``load`` returns the existing ``RoutedModel`` (routing/model.py) with the controllers shipped
for the model, or untrained ones (said in the log, and on every figure) where none ship.
Its traces are ``Trace``: a ``RoutingTrace`` (core/trace.py) that only adds views, drawn by
the app's figures (app/plots/), with plotly imported when a figure is first asked for.
``figure`` draws any ``RoutingTrace`` (a replay from the routing log, ``from_json``).
``calibrate`` trains a routed model's controllers on texts in hand through the CLI's
calibration (training/calibrate.py) and installs them on it.

This module sits on top, beside the CLI: it adapts routing and the figures to a notebook.
Never: hold routing or plotting logic of its own, or import torch, transformers or plotly
at import time.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.writable import output_problem

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from metaattn_viz.routing.controller import ControllerStack
    from metaattn_viz.routing.model import RoutedModel

__all__ = ["Trace", "calibrate", "figure", "load"]

log = logging.getLogger(__name__)

# where a calibration of texts given in Python says its data came from (meta.json "data")
TEXTS_SOURCE = "{n} texts given to metaattn_viz.calibrate"


def figure(trace: RoutingTrace, measure: str = "total", height: int = 780) -> go.Figure:
    """The routing maps of a trace as one plotly figure: the expert of every decision
    (layers x tokens, top) and its uncertainty under ``measure`` (bottom), the app's Live
    view. The title names the model and the controllers, and says when they are untrained
    (their routing does not reflect a calibrated posterior)."""
    import plotly.graph_objects as go

    from metaattn_viz.app.plots import routing_maps
    from metaattn_viz.app.plots.maps import MAPS_TITLE

    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a RoutingTrace (as route returns), got {type(trace).__name__}")
    # validated again: the app builds it unvalidated for speed, but in a notebook it is
    # shown, saved (write_html, write_image) and edited, which need a complete figure
    fig = go.Figure(routing_maps(trace, measure, height).to_dict())
    if trace.n_tokens:
        label = f"{trace.controller} controllers" + ("" if trace.controller_trained else ", UNTRAINED")
        # margin_t: room for the subtitle
        fig.update_layout(title_text=f"{MAPS_TITLE}<br><sub>{trace.model} ({label})</sub>", margin_t=64)
    return fig


class Trace(RoutingTrace):
    """A ``RoutingTrace`` that draws itself: ``figure()``, and its maps when a notebook
    shows it (``_repr_html_``). No fields of its own, so it equals, stores and serialises
    as the trace it is (``Trace.from_json`` reads ``to_json``'s record)."""

    def figure(self, measure: str = "total", height: int = 780) -> go.Figure:
        """The routing maps (``metaattn_viz.api.figure``)."""
        return figure(self, measure, height)

    def _repr_html_(self) -> str:
        # plotly's own notebook rendering (its renderer settings decide how plotly.js loads)
        return self.figure()._repr_html_()


def load(
    model: Any = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    backend: str | None = None,
    name: str | None = None,
    controllers: str | os.PathLike | None = None,
) -> RoutedModel:
    """A routed model whose traces draw themselves (``Trace``).

    ``model``: None (the bundled SmolLM2-135M-Instruct, routing/loading.py), a local folder,
    a ``.gguf`` file or a hub id (loaded, then placed by ``device``/``dtype``/``backend``
    as ``RoutedModel.load`` does; an empty path is refused, not taken for None; a checkpoint
    that lacks weights the model needs, such as a base model's without its language-model
    head, is refused by name rather than filled with random ones), or a ``(model, tokenizer)``
    pair already in hand: a transformers causal LM, routed where it is (moved only when
    ``device`` or ``dtype`` is given; ``backend`` alone keeps its device and dtype) and
    named ``name`` (a string; default: the last part of its ``name_or_path``), which picks
    the controllers shipped for it (``name`` with anything but a pair is refused: a loaded
    model takes its own name). Without shipped controllers the controllers are
    untrained: the log says so, and so do the traces and their figures.
    ``controllers``: a folder (``~`` is expanded) laid out as ``assets/controllers/<model>``
    (a ``bayes/`` and a ``priorfree/`` folder, as ``calibrate(..., save=...)`` writes), used
    in place of the shipped ones; a kind missing there, or made for another model shape, is
    untrained (said in the log). Trained controllers calibrated on other weights than the
    model's (their ``meta.json`` fingerprint, routing/fingerprint.py) are used, with a
    warning in the log and ``routed.weights_notice(kind)`` saying so. ``routed.detach()``
    (or ``with mav.load(...) as routed:``) gives the model back. Traces name their
    controllers by kind: ``route(..., controller="priorfree")`` takes the name, not a
    ControllerStack (``calibrate`` installs the stack it returns under its kind)."""
    from metaattn_viz.routing.model import RoutedModel

    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string (the model's name), got {type(name).__name__}")
    if name is not None and not name.strip():
        raise ValueError("name is empty: give the model's name, or leave name out for its name_or_path's")
    folders = _controller_folders(controllers)
    if isinstance(model, (str, os.PathLike)) and not str(model).strip():
        raise ValueError(
            "model is an empty path: give a folder, a .gguf file or a hub id, or leave model out "
            "(None) for the bundled model"
        )
    if model is None or isinstance(model, (str, os.PathLike)):
        if name is not None:  # it would be ignored: the loader names what it loads
            raise ValueError(
                "name names a (model, tokenizer) pair; a model loaded from a path, a hub id or "
                "the bundled one takes its own name. For other controllers, pass controllers="
            )
        routed = RoutedModel.load(
            None if model is None else str(model),
            controllers_dir=folders,
            device=device,
            dtype=dtype,
            backend=backend,
        )
    elif isinstance(model, tuple) and len(model) == 2:
        routed = _given(*model, name, folders, device=device, dtype=dtype, backend=backend)
    else:
        raise TypeError(
            "model must be None (the bundled model), a folder, a .gguf file or a hub id, "
            f"or a (model, tokenizer) pair; got {type(model).__name__}"
        )
    routed.trace_class = Trace
    for kind in routed.controllers:  # as the CLI and the page say it
        notice = routed.weights_notice(kind)
        if notice:
            log.warning("%s controllers of %s: %s", kind, routed.name, notice)
    return routed


def _folder(path: Any, argument: str) -> Path | None:
    """``load``'s ``controllers`` and ``calibrate``'s ``save``: None, or the folder path with
    ``~`` expanded (as the CLI expands its paths); refused, naming ``argument``, when it is not
    a path, or is empty (which would be the current folder)."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a folder path (a str or os.PathLike), got {type(path).__name__}")
    if not str(path).strip():
        raise ValueError(f"{argument} must name a folder, got an empty path (it would be the current folder)")
    return Path(path).expanduser()


def _controller_folders(controllers: str | os.PathLike | None) -> dict[str, Path] | None:
    """kind -> folder of a controllers folder (``load``'s ``controllers``), or None."""
    root = _folder(controllers, "controllers")
    if root is None:
        return None
    from metaattn_viz.routing.controller import KINDS

    if not root.is_dir():
        raise FileNotFoundError(f"controllers: no such folder: {root}")
    return {kind: root / kind for kind in KINDS}


def _given(
    model,
    tokenizer,
    name: str | None,
    folders: dict[str, Path] | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    backend: str | None = None,
) -> RoutedModel:
    """A RoutedModel of a model the caller already holds: moved to ``device`` in ``dtype``
    where either is given, else left on its own device and dtype (``backend`` alone is the
    default kernel backend there). A placement that cannot be made is refused before the
    model is routed, so the refusal leaves it as it was."""
    from metaattn_viz.routing import device as device_mod
    from metaattn_viz.routing import loading
    from metaattn_viz.routing.model import RoutedModel

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "parameters"):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be the model's tokenizer, got {type(tokenizer).__name__}")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(
            "the model's weights are on the meta device (its shapes only, no values): load the "
            "weights first, e.g. from_pretrained without a meta device map"
        )
    moving = device is not None or dtype is not None
    if moving:
        device_mod.check_placement(device, dtype, backend)
    elif backend is not None:  # where the model is: Triton with a model on the CPU is refused
        device_mod.resolve_backend(device_mod.parse_backend(backend), device_mod.placement_of(model))
    name = name or Path(str(getattr(config, "_name_or_path", "") or "")).name or type(model).__name__
    loaded = loading.LoadedModel(model, tokenizer, loading.ModelSource("given", name, name), 0.0, "given")
    routed = RoutedModel.from_loaded(loaded, folders)
    if any(stack.trained for stack in routed.controllers.values()):  # which weights they fit
        from metaattn_viz.routing.fingerprint import weights_fingerprint

        routed.weights_fingerprint = weights_fingerprint(model)
    # the controllers compute their features where the model runs (they stay float32)
    for stack in routed.controllers.values():
        stack.to(routed.device)
    if moving:
        routed.place(device, dtype, backend)
    elif backend is not None:
        routed.use_backend(backend)
    return routed


def calibrate(
    routed: RoutedModel,
    texts: Iterable[str] | os.PathLike,
    *,
    controller: str = "bayes",
    steps: int = 64,
    seq_len: int = 256,
    save: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    **options: Any,
) -> ControllerStack:
    """Train ``routed``'s ``controller`` stack ("bayes" or "priorfree") on ``texts`` and
    install it on ``routed``: its later traces use it and say it is trained. Returns the stack
    (its ``meta`` holds the run's record, as meta.json: final validation terms, loss curve,
    data, hyperparameters).

    The training is ``metaattn-viz calibrate``'s (training/calibrate.py, docs/method.md,
    ELBO): the model stays frozen, only the controllers learn, on windows of ``seq_len``
    tokens. ``texts``: a list of strings, joined with blank lines into one text that is split
    as the CLI splits a ``--data`` file (by WikiText article headings, else by paragraph:
    every tenth to validation, the last when fewer; so at least two), or the path of a text
    file (used as ``--data``). Together they must give at least one window for training and
    one for validation. ``options``: the other ``CalibrationConfig`` fields (``lr``, ``batch_size``,
    ``beta_kl``, ``seed``, ...).

    Progress: ``progress=True`` shows a tqdm bar with each step's loss terms (stderr, or the
    notebook's output); ``on_step`` is called after every step with its row (``step``,
    ``loss``, ``task``, ``kl``, ``cost``, ``hard``), and an exception it raises stops the
    run, installing and saving nothing.

    ``save``: a folder (``~`` is expanded) laid out as ``assets/controllers/<model>``; the
    stack is written to ``save/<controller>/`` (controller.safetensors and meta.json), which
    ``load(..., controllers=save)`` reads back. Without it the stack lives only on ``routed``.
    A ``save`` that cannot be written (empty, a file in the way, a read-only place) is refused
    before any training (writable.py, as the CLI's ``--out``); the stack is installed on
    ``routed`` before it is written, so a write that fails all the same loses nothing.
    ``seq_len``: at least 2 (a window trains on its next-token predictions).

    The model is handed back as it came: its parameters' ``requires_grad`` and torch's
    random state are restored (the run seeds its own)."""
    import torch

    from metaattn_viz.routing.controller import KINDS, ControllerStack
    from metaattn_viz.routing.model import RoutedModel
    from metaattn_viz.training import calibrate as calibration
    from metaattn_viz.training.data import TooShort
    from metaattn_viz.training.evaluate import MIN_SEQ_LEN

    if not isinstance(routed, RoutedModel):
        raise TypeError(f"routed must be a RoutedModel (from metaattn_viz.load), got {type(routed).__name__}")
    if controller not in KINDS:
        raise ValueError(f"controller must be one of {', '.join(KINDS)}, got {controller!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        raise ValueError(
            f"seq_len must be a whole number >= {MIN_SEQ_LEN} (a window of seq_len tokens trains on "
            f"its seq_len - 1 next-token predictions), got {seq_len!r}"
        )
    cfg = calibration.CalibrationConfig(controller=controller, steps=steps, seq_len=seq_len, **options)
    routed.check_attached()
    if cfg.seq_len > routed.max_context:
        raise ValueError(
            f"seq_len {cfg.seq_len} is longer than the model's context ({routed.max_context} tokens)"
        )
    root = _folder(save, "save")
    source = _texts(texts)
    target = None if root is None else root / controller
    if target is not None:  # before training, which takes minutes (as the CLI's --out)
        if any(p.exists() and not p.is_dir() for p in (target, *target.parents)):
            raise ValueError(f"save: {root} must be a folder (or not exist yet); a file is in the way")
        problem = output_problem(target, "save", folder=True)
        if problem is not None:
            raise ValueError(problem)

    params = list(routed.model.parameters())
    grads = [p.requires_grad for p in params]
    cuda = [routed.device] if routed.device.type == "cuda" else []
    # the stack's construction (load) draws from torch's random state too
    with tempfile.TemporaryDirectory(prefix="metaattn-calibrate-") as tmp, torch.random.fork_rng(cuda):
        if isinstance(source, Path):
            data = source
        else:
            data = Path(tmp) / "texts.txt"
            data.write_text("\n\n".join(source), encoding="utf-8")
        try:
            calibration.calibrate(
                routed,
                data,
                cfg,
                out_dir=Path(tmp) / "run",
                progress=progress,
                model_slug=routed.slug,
                on_step=on_step,
            )
        except TooShort as exc:  # said for this call: its texts and its seq_len argument
            raise exc.with_remedy("give more or longer texts, or a smaller seq_len") from None
        finally:
            for p, g in zip(params, grads, strict=True):
                p.requires_grad_(g)
        stack = ControllerStack.load(Path(tmp) / "run")
    if not isinstance(source, Path):
        stack.meta["data"]["file"] = TEXTS_SOURCE.format(n=len(source))
    # installed first: a save that fails after all (a full disk) loses no training
    routed.controllers[controller] = stack.to(routed.device)
    routed.controller_sources[controller] = "mav.calibrate (not saved)"
    if target is not None:
        try:
            stack.save(target, stack.meta)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"save: the trained {controller} controllers could not be written to {target} "
                f"({exc.strerror or exc}); they are installed on the routed model all the same: write "
                f"them with `stack = routed.controllers[{controller!r}]; stack.save(folder, stack.meta)`",
            ) from exc
        routed.controller_sources[controller] = str(target)
    return stack


def _texts(texts) -> Path | list[str]:
    """``calibrate``'s ``texts``: the path of a text file, or the texts that are not blank."""
    if isinstance(texts, os.PathLike):
        path = Path(texts)
        if not path.is_file():
            raise FileNotFoundError(f"texts: no such file: {path}")
        return path
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings or a pathlib.Path to a text file, not one string")
    items = list(texts)
    wrong = [type(t).__name__ for t in items if not isinstance(t, str)]
    if wrong:
        raise TypeError(f"texts must be strings; got {', '.join(sorted(set(wrong)))}")
    kept = [t.strip() for t in items if t.strip()]
    if not kept:
        raise ValueError("texts: no text to calibrate on (empty, or only blank strings)")
    return kept
