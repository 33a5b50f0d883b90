"""The Hugging Face Hub calls of a deploy, in order, and nothing else.

`push` carries out a `DeployPlan` with an `HfApi`-like object: create the storage bucket;
create the Space with the plan's hardware, variables and bucket mount, or, where it
exists, set its volumes (remove them without storage), variables (and remove every other
variable the Space has; its secrets are never touched) and hardware; then upload the
staged files in one commit, the bundled GGUF among them when the plan ships it
(docs/deploy.md, "What a deploy does on the Hub"). The calls are thin so that a test can
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
# What a 402 from the Hub means for a deploy (Hub docs, spaces-overview.md, since 2026-07;
# huggingface_hub's create_repo docstring): docs/deploy.md, step 1.
PAYMENT_REQUIRED = (
    "creating a Gradio Space on cpu-basic needs a paid plan (PRO, or Team/Enterprise for an "
    "organization), paid hardware needs billing set up; a free account can host up to 2 "
    "ZeroGPU Spaces: --hardware zero-a10g; docs/deploy.md"
)


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
    with an HTTP error (a revoked token, a name taken...; a 402 adds what a free account
    can deploy), "could not reach the Hub" where no answer came (offline, DNS, a timeout:
    huggingface_hub's HTTP client's transport errors, and OSErrors that are not HTTP
    answers)."""
    if isinstance(exc, HubFailure):  # said already
        return exc
    what = f"{type(exc).__name__}: {exc}"
    response = getattr(exc, "response", None)
    transport = any(c.__name__ == "TransportError" for c in type(exc).__mro__)
    if response is None and (transport or isinstance(exc, (ConnectionError, TimeoutError))):
        return HubFailure(f"could not reach the Hub ({what})")
    if getattr(response, "status_code", None) == 402:
        what += f" ({PAYMENT_REQUIRED})"
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

    A new Space is created with the plan's hardware, variables and bucket mount in the one
    `create_repo` call, so it never starts on other hardware than the plan's (creating a
    Gradio Space on cpu-basic needs a paid plan since 2026-07; a free account can host
    ZeroGPU Spaces: docs/deploy.md). An existing Space gets them through the Space calls:
    the volumes set (or, with `storage: null`, removed), the variables added and every
    other variable on the Space deleted (the Spacefile owns them: one it no longer names,
    such as METAATTN_SHARED_LOG, must not stay set; secrets stay), the hardware requested.
    All of this comes before the upload, so the build that the upload starts already runs
    with them; and the staging comes before all of it, so a checkout file that became a
    link since the plan was made stops the deploy before any Hub call.

    The upload is one commit (`create_commit`, not `upload_folder`, which may split a
    folder into several commits, each starting a build of a half-updated Space). It
    mirrors the plan: files on the Space that the plan does not list are deleted in that
    commit (`.gitattributes` excepted, by the Hub's rule). So a variable that pointed at
    such a file (METAATTN_MODEL at a GGUF an earlier deploy uploaded) is removed too, as
    the plan does not set it.
    """
    from huggingface_hub import Volume

    with tempfile.TemporaryDirectory(prefix="metaattn-deploy-") as tmp:
        try:  # first: a file that became a link after planning stops it before any Hub call
            plan.stage(root, Path(tmp))
        except ValueError as exc:
            raise HubFailure(f"nothing was changed on the Hub: {exc}") from None
        volumes = None
        if plan.storage is not None:
            api.create_bucket(plan.bucket_id, private=True, exist_ok=True)
            volumes = [Volume(type="bucket", source=plan.bucket_id, mount_path=plan.storage.mount_path)]
        url = None
        if api.repo_exists(plan.space, repo_type="space"):
            _update_space(plan, api, volumes)
        else:
            url = api.create_repo(
                plan.space,
                repo_type="space",
                space_sdk="gradio",
                private=plan.private,
                space_hardware=plan.hardware,
                space_variables=[{"key": k, "value": v} for k, v in plan.variables.items()],
                space_volumes=volumes,
            )
        api.create_commit(
            repo_id=plan.space,
            repo_type="space",
            operations=_operations(plan, Path(tmp), api.list_repo_files(plan.space, repo_type="space")),
            commit_message=f"metaattn-viz deploy ({plan.hardware}, {plan.runtime} requirements)",
        )
    return f"https://huggingface.co/spaces/{plan.space}" if url is None else str(url)


def _update_space(plan: DeployPlan, api: Any, volumes: list[Any] | None) -> None:
    """Bring an existing Space's volumes, variables and hardware to the plan's."""
    if volumes is not None:
        api.set_space_volumes(plan.space, volumes=volumes)
    elif plan.remove_volumes and api.get_space_runtime(plan.space).volumes:
        # delete_space_volumes refuses a Space with none, hence the look first
        api.delete_space_volumes(plan.space)
    for key, value in plan.variables.items():
        api.add_space_variable(plan.space, key, value)
    # The Spacefile owns the Space's variables: one it no longer names goes (secrets are
    # another list, which get_space_variables does not return and nothing here touches).
    for key in plan.removed_variables(api.get_space_variables(plan.space) or {}):
        api.delete_space_variable(plan.space, key)
    api.request_space_hardware(plan.space, plan.hardware)


def _operations(plan: DeployPlan, staged: Path, on_space: list[str]) -> list[Any]:
    """The one commit's operations: delete what the Space holds and the plan does not list
    (never `.gitattributes`), add every planned file from the staged folder."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    planned = {f.path for f in plan.files}
    ops: list[Any] = [
        CommitOperationDelete(path_in_repo=path)
        for path in sorted(on_space)
        if path not in planned and path != ".gitattributes"
    ]
    ops += [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(staged / f.path)) for f in plan.files]
    return ops
