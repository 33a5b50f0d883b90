"""Who a run belongs to: the owner key that `runs.owner` holds, and the check that every
scoped read applies to it (docs/architecture.md, the routing log).

A run made on a public deployment records its owner: a browser session (`session_owner`)
or a signed-in user (`user_owner`). A reader given an owner sees that owner's runs only;
a reader given None sees every run (the CLI, a local single-user server, an operator's
shared log). A session's key is a digest of its id, never the id itself: in a shared
log every visitor can read the owner column, and a live session id would let them
follow that session's events.

Pure functions: never opens a database, never imports gradio or the model code.
"""

from __future__ import annotations

import hashlib

MAX_OWNER_CHARS = 200


def check_owner(owner: str | None) -> str | None:
    """`owner` if it is None (every run) or a usable key; ValueError otherwise. An empty
    key is refused rather than read as "nobody's runs": it is a caller's bug."""
    if owner is None:
        return None
    if not isinstance(owner, str) or not owner.strip() or len(owner) > MAX_OWNER_CHARS:
        raise ValueError(
            f"owner must be None or a non-empty name of at most {MAX_OWNER_CHARS} characters, got {owner!r}"
        )
    return owner


def session_owner(session_id: str) -> str:
    """The owner key of a browser session (e.g. gradio's request.session_hash)."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
    return "session:" + hashlib.sha256(session_id.encode()).hexdigest()[:32]


def user_owner(username: str) -> str:
    """The owner key of a signed-in user (e.g. the HF OAuth user name): their runs stay
    theirs across sessions."""
    if not isinstance(username, str) or not username.strip():
        raise ValueError(f"username must be a non-empty string, got {username!r}")
    key = "user:" + username.strip()
    check_owner(key)  # too long a name is refused here, not at the first read
    return key
