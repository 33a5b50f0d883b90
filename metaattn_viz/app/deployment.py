"""What kind of deployment a server is, and the policies that follow from it: whose runs a
visitor sees, what the page says about that and about storage, and the queue limits.

- Local (`make run`, `metaattn-viz serve`): one user; runs record no owner and every
  reader sees every run, as before.
- Public (`SPACE_ID` set, i.e. a Hugging Face Space, or `serve --public`): every run
  records the browser session that made it (store.session_owner of gradio's
  session_hash; gradio_client sessions are sessions too) and a visitor reads only their
  own runs: History, replay, compare, the SQL console, the export and the API endpoints.
- Public with the operator's shared log (`METAATTN_SHARED_LOG=1`): runs still record
  their session, but every visitor reads every run, and the page says so.

Storage: on a Space without METAATTN_DATA / METAATTN_DB, or whose log's folder is not under
a mount point (paths.storage_is_ephemeral), the log lives on the Space's own disk and is
lost when it restarts; the page says so.

Pure policy over plain values: never imports gradio, never opens the log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from metaattn_viz import paths
from metaattn_viz.app.environment import flag_from_env, whole_from_env
from metaattn_viz.app.errors import AppError
from metaattn_viz.store.owners import session_owner
from metaattn_viz.store.sandbox import MAX_WORKERS as CONSOLE_WORKERS

SHARED_LOG_ENV = "METAATTN_SHARED_LOG"
QUEUE_SIZE_ENV = "METAATTN_QUEUE_SIZE"


@dataclass(frozen=True)
class QueueLimits:
    """How many events of each kind run at once, and how many may wait.

    `model`: generations and re-routes together (they share the CPU and the model);
    `sweep`: budget sweeps (a dozen prefills each); `sql`: console queries (each in its
    own worker process); `default`: every other queued event. `max_size`: events waiting
    in the queue at most (None: no limit); when it is full Gradio refuses new events with
    "This application is currently busy. Please try again." (gradio_client: "Queue is
    full! Please try again.")."""

    model: int = 4
    sweep: int = 1
    sql: int = CONSOLE_WORKERS  # more would only wait for a console worker
    default: int = 4
    max_size: int | None = None


LOCAL_LIMITS = QueueLimits()
# A free CPU Space has 2 cores: two generations at once already share them.
PUBLIC_LIMITS = QueueLimits(model=2, max_size=24)


def session_of(request) -> str | None:
    """The browser (or gradio_client) session of a gradio request, None without one."""
    return getattr(request, "session_hash", None) or None


@dataclass(frozen=True)
class Deployment:
    """Public or local, shared log or not, storage that lasts or not."""

    public: bool = False
    shared_log: bool = False
    ephemeral_storage: bool = False

    @classmethod
    def detect(cls, public: bool = False) -> Deployment:
        """From the environment: public if `public` (serve --public) or SPACE_ID is set;
        the shared log from METAATTN_SHARED_LOG; ephemeral storage from paths."""
        return cls(
            public=bool(public or os.environ.get("SPACE_ID")),
            shared_log=flag_from_env(SHARED_LOG_ENV),
            ephemeral_storage=paths.storage_is_ephemeral(),
        )

    @property
    def scoped(self) -> bool:
        """True when each visitor reads only their own runs."""
        return self.public and not self.shared_log

    def owner(self, session: str | None) -> str | None:
        """The owner key a run made in browser session `session` records (None locally,
        or when there is no session)."""
        return session_owner(session) if self.public and session else None

    def reader(self, session: str | None) -> str | None:
        """Whose runs session `session` may read: its own when scoped, else None (every
        run). A scoped read without a session is refused, never widened to every run."""
        if not self.scoped:
            return None
        if not session:
            raise AppError("This request has no browser session, so it cannot be shown any runs.")
        return session_owner(session)

    @property
    def limits(self) -> QueueLimits:
        """The queue limits: tighter on a public deployment (METAATTN_QUEUE_SIZE sets the
        queue's size there)."""
        if not self.public:
            return LOCAL_LIMITS
        size = whole_from_env(QUEUE_SIZE_ENV, PUBLIC_LIMITS.max_size or 0, 1)
        return replace(PUBLIC_LIMITS, max_size=size)

    def status(self) -> dict:
        """The deployment's part of Engine.status()."""
        return {
            "public": self.public,
            "runs_visible_to": "owner" if self.scoped else "everyone",
            "storage_ephemeral": self.ephemeral_storage,
            "queue_max_size": self.limits.max_size,
        }


__all__ = [
    "Deployment",
    "session_of",
    "QueueLimits",
    "LOCAL_LIMITS",
    "PUBLIC_LIMITS",
    "SHARED_LOG_ENV",
    "QUEUE_SIZE_ENV",
]
