"""The Gradio page. Every callback is a thin adapter over a library call.

(Foundation version: model status and a plain continuation; the routing views land with
the app issue.) Never holds model logic of its own.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class ModelHolder:
    """Loads the model once, in the background, so the page is up before the model is."""

    def __init__(self, spec: str | None):
        self.spec = spec
        self.loaded = None
        self.error: str | None = None
        self._done = threading.Event()
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        from metaattn_viz import model_loading

        try:
            self.loaded = model_loading.load(self.spec)
        except Exception as exc:  # shown on the page; the server keeps serving
            log.error("model loading failed: %s", exc)
            self.error = str(exc)
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None):
        self._done.wait(timeout)
        if self.error:
            raise RuntimeError(self.error)
        return self.loaded

    def status(self) -> str:
        if not self._done.is_set():
            return "Loading the model..."
        if self.error:
            return f"Model unavailable: {self.error}"
        m = self.loaded
        return f"Model **{m.name}** ready (loaded from {m.loaded_from} in {m.load_seconds:.1f} s)."


def build_app(model: str | None = None, db: str | None = None, log_runs: bool = True):
    import gradio as gr

    holder = ModelHolder(model)

    def continue_text(prompt: str, max_new_tokens: int):
        if not prompt or not prompt.strip():
            raise gr.Error("The prompt is empty: type some text first.")
        try:
            m = holder.wait(timeout=120)
        except RuntimeError as exc:
            raise gr.Error(str(exc)) from exc
        import torch

        ids = m.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = m.model.generate(ids, max_new_tokens=int(max_new_tokens), do_sample=False)
        return m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    with gr.Blocks(title="metaattn-viz") as demo:
        gr.Markdown("# metaattn-viz\nBayesian per-token attention routing, live.")
        status = gr.Markdown(holder.status())
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=3, scale=4)
            n = gr.Slider(1, 128, value=32, step=1, label="Max new tokens", scale=1)
        go = gr.Button("Generate", variant="primary")
        out = gr.Textbox(label="Continuation", lines=4)
        go.click(continue_text, [prompt, n], out, api_name="continue_text")
        timer = gr.Timer(2.0)
        timer.tick(holder.status, None, status)
    return demo
