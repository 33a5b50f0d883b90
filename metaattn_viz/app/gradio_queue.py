"""What the app reads of Gradio's queue: whether the client of the event being processed
has gone (`client_gone`), and whether a browser session has events pushed to the queue that
have not ended (`session_pending`). Both read internals of the pinned Gradio 6, defensively:
where those differ they answer as if they could not tell ("not gone", None), and the tests
that run them against a real Gradio queue fail (tests/test_app_api.py,
tests/test_live_streaming_state.py). Outside an event (a direct call) they cannot tell
either."""

from __future__ import annotations


def _queue():
    """The queue of the page whose event is being processed, or None."""
    from gradio.context import LocalContext

    return getattr(LocalContext.blocks.get(None), "_queue", None)


def client_gone():
    """A check whether the client of the event now being processed has gone. Gradio marks
    a queued event not alive when its client's event stream closes, but cancels no running
    coroutine, so an endpoint that runs for long asks; outside an event never gone."""
    from gradio.context import LocalContext

    queue = _queue()
    event_id = LocalContext.event_id.get(None)

    def gone() -> bool:
        for job_set in getattr(queue, "active_jobs", None) or []:
            for event in job_set or []:
                if getattr(event, "_id", None) == event_id:
                    return not getattr(event, "alive", True)
        return False

    return gone


def session_pending(session: str | None) -> bool | None:
    """Whether browser `session` has events in Gradio's queue that have not ended (waiting,
    or being processed until their client has their last message), or None where it cannot
    tell. An event the queue refused (full) was never pushed: it is not pending."""
    pending = getattr(_queue(), "pending_event_ids_session", None)
    if session is None or not isinstance(pending, dict):
        return None
    return bool(pending.get(session))


__all__ = ["client_gone", "session_pending"]
