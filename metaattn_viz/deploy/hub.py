"""The Hugging Face Hub calls of a deploy, in order, and nothing else.

`push` carries out a `DeployPlan` with an `HfApi`-like object: create the Space, mount
the storage bucket, set the variables (and remove the ones the plan unsets), request the
hardware, upload the staged folder, the bundled GGUF among its files when the plan ships
it (docs/deploy.md, "What a deploy does on the Hub"). The calls are thin so that a test can
hand in a fake object and check every call and argument without a network.

Never decides anything (the plan did), never reads the manifest, never prints.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metaattn_viz.deploy.plan import DeployPlan

TOKEN_ENV = "HF_TOKEN"


class MissingToken(RuntimeError):
    """No Hugging Face token: neither HF_TOKEN nor a stored `hf auth login`."""

    def __init__(self) -> None:
        super().__init__(
            "no Hugging Face token: set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens), or run `hf auth login` once"
        )


def resolve_token(environ: Mapping[str, str] | None = None) -> str:
    """HF_TOKEN, else the token stored by `hf auth login`; MissingToken when neither."""
    environ = os.environ if environ is None else environ
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    from huggingface_hub import get_token

    stored = get_token()
    if not stored:
        raise MissingToken()
    return stored


class HubFailure(RuntimeError):
    """A Hub call failed: the Hub answered with an error, or could not be reached. One line."""


def failure(exc: BaseException) -> HubFailure:
    """What went wrong with a Hub call, in one line: "the Hub refused" where it answered
    with an HTTP error (a revoked token, a name taken...), "could not reach the Hub" where
    no answer came (offline, DNS, a timeout: huggingface_hub's HTTP client's transport
    errors, and OSErrors that are not HTTP answers)."""
    what = f"{type(exc).__name__}: {exc}"
    answered = getattr(exc, "response", None) is not None
    transport = any(c.__name__ == "TransportError" for c in type(exc).__mro__)
    if not answered and (transport or isinstance(exc, (ConnectionError, TimeoutError))):
        return HubFailure(f"could not reach the Hub ({what})")
    return HubFailure(f"the Hub refused: {what}")


def make_api(token: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token)


def whoami(api: Any) -> str:
    """The user name the token belongs to (the default owner of the Space)."""
    try:
        return str(api.whoami()["name"])
    except Exception as exc:  # offline, or a revoked token: one line for the user
        why = f"could not ask the Hub whose token this is: {failure(exc)}"
        raise HubFailure(f"{why}; pass --space OWNER/NAME") from None


def push(plan: DeployPlan, api: Any, root: Path) -> str:
    """Deploy `plan` (built from checkout `root`); returns the Space's URL.

    Variables, the bucket mount and the hardware are set before the upload, so the build
    that the upload starts already runs with them. The upload mirrors the plan: files on
    the Space that the plan does not list are deleted in the same commit (`.gitattributes`
    excepted, by the Hub's rule). So a variable that pointed at such a file (METAATTN_MODEL
    at a GGUF an earlier deploy uploaded) is removed too, when the plan unsets it.
    """
    from huggingface_hub import Volume

    url = api.create_repo(
        plan.space, repo_type="space", space_sdk="gradio", private=plan.private, exist_ok=True
    )
    if plan.storage is not None:
        api.create_bucket(plan.bucket_id, private=True, exist_ok=True)
        api.set_space_volumes(
            plan.space,
            volumes=[Volume(type="bucket", source=plan.bucket_id, mount_path=plan.storage.mount_path)],
        )
    for key, value in plan.variables.items():
        api.add_space_variable(plan.space, key, value)
    if plan.unset_variables:
        present = api.get_space_variables(plan.space) or {}
        for key in plan.unset_variables:
            if key in present:
                api.delete_space_variable(plan.space, key)
    api.request_space_hardware(plan.space, plan.hardware)
    with tempfile.TemporaryDirectory(prefix="metaattn-deploy-") as tmp:
        plan.stage(root, Path(tmp))
        api.upload_folder(
            repo_id=plan.space,
            repo_type="space",
            folder_path=tmp,
            allow_patterns=list(plan.include),
            ignore_patterns=list(plan.exclude),
            delete_patterns="*",
            commit_message=f"metaattn-viz deploy ({plan.hardware}, {plan.runtime} requirements)",
        )
    return f"https://huggingface.co/spaces/{plan.space}" if url is None else str(url)
