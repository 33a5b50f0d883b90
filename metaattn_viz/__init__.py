"""metaattn-viz: watch Bayesian per-token attention routing (Meta-Attention) in a real LM.

The package is the library behind the app: model loading, the routing core, calibration,
evaluation, the routing log, plots, the Gradio UI and the CLI. Importing it is cheap: no
torch, transformers or gradio import happens here.
"""

from metaattn_viz.paths import ensure_kernels_importable

__version__ = "0.1.0"

ensure_kernels_importable()
