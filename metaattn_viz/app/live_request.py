"""What a Generate of the Live tab asks for, read from its controls and checked: the prompt,
the generation settings and the routing controls' settings as one GenerateRequest
(`generation_request`), or AppError with a sentence.

The same reading serves twice. First the check that runs when Generate is pressed, outside
the queue and with no outputs (tab_live.py): a refused Generate (a prompt of spaces, a bad
seed) says so in its toast alone and leaves the page as it was. Refused by the generation
itself, whose outputs are the views, it put Gradio's red "Error" badge on the maps, the
strip, the meters, the status line and the inspector's position, over the previous run's
views. Then the generation, which reads the request again to run it.

The values are read as the browser sent them (both events skip Gradio's preprocessing), so
every bad value gets the app's sentence: Gradio's own answered a seed of -1 with "Value -1
is less than minimum value 0." and rounded 1.5 to 2 without a word (`seed`). The named API
endpoints (api.py) keep their own checks and messages (requests.parse_request). Never
touches the model, the log or the queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metaattn_viz.app.errors import AppError, quoted
from metaattn_viz.app.requests import SEED_MAX, GenerateRequest, parse_request, whole

if TYPE_CHECKING:  # for annotations: the tab imports this module
    from metaattn_viz.app.tab_live import LiveTab


def seed(value) -> int:
    """The Seed box's value: a whole number from 0 to SEED_MAX. Anything else (an empty
    box, -1, 1.5, 1e20) gets one sentence; 1.5 is refused, not rounded (a seed that is not
    the one typed would make another text than the one asked for)."""
    try:
        return whole("Seed", value, 0, SEED_MAX)
    except AppError:
        empty = value is None or (isinstance(value, str) and not value.strip())
        got = "an empty box" if empty else quoted(value)
        raise AppError(f"Seed must be a whole number between 0 and {SEED_MAX:,}, got {got}.") from None


def generation_request(tab: LiveTab, data: dict) -> GenerateRequest:
    """The request of a Generate from the Live tab's input values (`data`, by component, as
    the browser sent them), or AppError."""
    return parse_request(
        data[tab.prompt],
        tab.routing.settings(data),
        data[tab.controller],
        data[tab.max_new],
        data[tab.temperature],
        data[tab.top_p],
        seed(data[tab.seed]),
        data[tab.chat],
        data[tab.quality],
        data[tab.model] or "",
    )


__all__ = ["generation_request", "seed"]
