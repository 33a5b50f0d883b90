"""Routing a pretrained causal LM: controllers, budget solving, the routed model, decoding.

Policy (controller.py, budget.py, policies.py: which expert each token gets) lives here;
mechanics (the experts' kernels) live in `metaattn_kernels`. model.py is the entry point
(RoutedModel); session.py plugs sessions into transformers; prefill.py and generation.py
are the passes; records.py keeps the decisions; kv_cache.py and loading.py serve the model.
Never imports the store or gradio.
"""
