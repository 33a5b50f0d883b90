"""The Gradio app: the engine behind the page, its figures, the page itself, the server.

Model logic stays in `metaattn_viz.routing`; this package only adapts it to the page.
"""
