"""metaattn-viz: watch Bayesian per-token attention routing (Meta-Attention) in a real LM.

The package is the library behind the app: model loading, the routing core, calibration,
evaluation, the routing log, plots, the Gradio UI and the CLI. From Python (metaattn_viz/api.py):

    import metaattn_viz as mav
    routed = mav.load()
    trace = routed.route("The capital of France is", budget=0.3, max_new_tokens=16)
    trace.figure()

Importing it is cheap: the public names below load their modules on first use, so no
torch, transformers, gradio or plotly import happens here. Never import a subpackage at
module level here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from metaattn_viz.paths import ensure_kernels_importable

__version__ = "0.1.0"

ensure_kernels_importable()

# public name -> the module that defines it (its one definition)
_LAZY = {
    "load": "metaattn_viz.api",
    "calibrate": "metaattn_viz.api",
    "figure": "metaattn_viz.api",
    "Trace": "metaattn_viz.api",
    "RoutedModel": "metaattn_viz.routing.model",
    "Sampling": "metaattn_viz.routing.model",
    "RoutingTrace": "metaattn_viz.core.trace",
    "RoutingSettings": "metaattn_viz.core.settings",
}

__all__ = [
    "RoutedModel",
    "RoutingSettings",
    "RoutingTrace",
    "Sampling",
    "Trace",
    "__version__",
    "calibrate",
    "figure",
    "load",
]

if TYPE_CHECKING:
    from metaattn_viz.api import Trace, calibrate, figure, load
    from metaattn_viz.core.settings import RoutingSettings
    from metaattn_viz.core.trace import RoutingTrace
    from metaattn_viz.routing.model import RoutedModel, Sampling


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'metaattn_viz' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
