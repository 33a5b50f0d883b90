"""Benchmarks: each prints ratios against a baseline measured in the same run.

`python -m metaattn_viz.bench.attention` (kernels and whole model, `metaattn-viz bench`),
`.ui` (the app), `.store` (the routing log). Never asserts on time.
"""
