"""The bottom layer: the experts (experts.py), the settings (settings.py), the Dirichlet
maths (dirichlet.py) and the routing trace (trace.py).

Everything above (routing, training, store, app) imports from here; nothing here imports
from above, and below it only the kernels' name-only and FLOPs modules
(metaattn_kernels.experts, metaattn_kernels.flops). Never imports transformers, duckdb or
gradio, nor torch at module level (torch-free callers such as the store use it).
"""
