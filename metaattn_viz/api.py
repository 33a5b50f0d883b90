"""The notebook entry points: route a model in a few lines of Python and look at the result.

    import metaattn_viz as mav
    routed = mav.load()                      # or a folder, a GGUF file, a hub id, (model, tokenizer)
    trace = routed.route("The capital of France is", budget=0.3, max_new_tokens=16)
    trace.figure()                           # the routing maps; a notebook shows `trace` itself
    routed.detach()                          # the model as it was, bit for bit

``load`` returns the existing ``RoutedModel`` (routing/model.py) with the controllers shipped
for the model, or untrained ones (said in the log, and on every figure) where none ship.
Its traces are ``Trace``: a ``RoutingTrace`` (core/trace.py) that only adds views, drawn by
the app's figures (app/plots/), with plotly imported when a figure is first asked for.
``figure`` draws any ``RoutingTrace`` (a replay from the routing log, ``from_json``).

This module sits on top, beside the CLI: it adapts routing and the figures to a notebook.
Never: hold routing or plotting logic of its own, or import torch, transformers or plotly
at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaattn_viz.core.trace import RoutingTrace

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from metaattn_viz.routing.model import RoutedModel

__all__ = ["Trace", "figure", "load"]


def figure(trace: RoutingTrace, measure: str = "total", height: int = 780) -> go.Figure:
    """The routing maps of a trace as one plotly figure: the expert of every decision
    (layers x tokens, top) and its uncertainty under ``measure`` (bottom), the app's Live
    view. The title names the model and the controllers, and says when they are untrained
    (their routing does not reflect a calibrated posterior)."""
    import plotly.graph_objects as go

    from metaattn_viz.app.plots import routing_maps
    from metaattn_viz.app.plots.maps import MAPS_TITLE

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
) -> RoutedModel:
    """A routed model whose traces draw themselves (``Trace``).

    ``model``: None (the bundled SmolLM2-135M-Instruct, routing/loading.py), a local folder,
    a ``.gguf`` file or a hub id (loaded, then placed by ``device``/``dtype``/``backend``
    as ``RoutedModel.load`` does), or a ``(model, tokenizer)`` pair already in hand: a
    transformers causal LM, routed where it is (moved only when ``device`` or ``dtype``
    is given) and named ``name`` (default: the last part of its ``name_or_path``), which
    picks the controllers shipped for it. Without shipped controllers the controllers are
    untrained: the log says so, and so do the traces and their figures.
    ``routed.detach()`` (or ``with mav.load(...) as routed:``) gives the model back."""
    from metaattn_viz.routing.model import RoutedModel

    if model is None or isinstance(model, (str, os.PathLike)):
        routed = RoutedModel.load(
            None if model is None else str(model), device=device, dtype=dtype, backend=backend
        )
    elif isinstance(model, tuple) and len(model) == 2:
        routed = _given(*model, name)
        if device is not None or dtype is not None or backend is not None:
            routed.place(device, dtype, backend)
    else:
        raise TypeError(
            "model must be None (the bundled model), a folder, a .gguf file or a hub id, "
            f"or a (model, tokenizer) pair; got {type(model).__name__}"
        )
    routed.trace_class = Trace
    return routed


def _given(model, tokenizer, name: str | None) -> RoutedModel:
    """A RoutedModel of a model the caller already holds, left on its device and dtype."""
    from metaattn_viz.routing import loading
    from metaattn_viz.routing.model import RoutedModel

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "parameters"):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    name = name or Path(str(getattr(config, "_name_or_path", "") or "")).name or type(model).__name__
    loaded = loading.LoadedModel(model, tokenizer, loading.ModelSource("given", name, name), 0.0, "given")
    routed = RoutedModel.from_loaded(loaded)
    # the controllers compute their features where the model runs (they stay float32)
    for stack in routed.controllers.values():
        stack.to(routed.device)
    return routed
