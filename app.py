"""Entry point for Hugging Face Spaces and `make run`: build the Gradio app and launch it.

Everything lives in the `metaattn_viz` package; see docs/architecture.md.
"""

import logging

from metaattn_viz.app.server import serve

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve()
