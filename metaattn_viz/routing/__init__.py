"""Routing a pretrained causal LM: controllers, budget solving, the routed model, decoding.

Policy (controller, prior, budget, hedging) lives here; mechanics (the experts' kernels)
live in `metaattn_kernels`. Never imports the store or gradio.
"""
