"""The Gradio app: the engine behind the page, its figures, the page itself, the server.

engine (host, history, analysis, generation; requests, errors) never imports gradio;
ui (tab_live, tab_history, api, ui_errors, plotly_html, display) adapts it to the page.
Model logic stays in `metaattn_viz.routing`; this package only adapts it to the page.
"""
