"""The bottom layer: experts and settings, the Dirichlet maths, the routing trace.

Everything above (routing, training, store, app) imports from here; nothing here imports
from above. Never imports transformers, duckdb or gradio.
"""
