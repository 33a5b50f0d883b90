"""Which models a server offers: those with controllers shipped in
``assets/controllers/<slug>/``, plus any the operator names (``serve --model A --model B``,
or ``METAATTN_MODELS=A,B``; ``METAATTN_MODEL`` names one more), each with the label the page
shows. A model whose controllers are not trained says so in its label.

Policy only: nothing here loads a model (host.py does, through routing/loading.py's
resolution order). A model's id is the slug of its name, the same slug its shipped
controllers live under and a trace's ``model`` turns into (``model_id``), so a trace finds
the model that made it; `offered_model` finds a run's model among a dropdown's choices, and
`missing_model_note` says which model Generate uses where the server does not offer it.
Never imports gradio.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from metaattn_viz import paths
from metaattn_viz.app.errors import quoted
from metaattn_viz.paths import MODEL_ENV
from metaattn_viz.routing.controller import KINDS, META_FILE, WEIGHTS_FILE
from metaattn_viz.routing.loading import BUNDLED_NAME, resolve, slugify

log = logging.getLogger(__name__)

ENV_MODELS = "METAATTN_MODELS"  # comma-separated model specs the operator offers
UNTRAINED = "untrained controllers"


@dataclass(frozen=True)
class ModelChoice:
    """One model the page can route with."""

    id: str  # slug of its name: assets/controllers/<id>/, model_id(trace.model)
    spec: str | None  # what routing/loading.py resolves (None: the bundled default)
    name: str  # display name, e.g. "SmolLM2-135M-Instruct"
    trained: Mapping[str, bool] = field(default_factory=dict)  # controller kind -> shipped weights

    @property
    def label(self) -> str:
        return model_label(self.name, self.trained)


def model_id(name: str) -> str:
    """The id of a model of this name (a trace's ``model``, a RoutedModel's ``name``)."""
    return slugify(name)


def model_label(name: str, trained: Mapping[str, bool]) -> str:
    """The name, with "(untrained controllers)" when no controller kind is trained, or
    "(untrained <kind> controllers)" naming the kinds that are not."""
    missing = [k for k in KINDS if not trained.get(k, False)]
    if not missing:
        return name
    if len(missing) == len(KINDS):
        return f"{name} ({UNTRAINED})"
    return f"{name} (untrained {', '.join(missing)} controllers)"


def shipped_trained(model_slug: str, controllers_dir: Path | None = None) -> dict[str, bool]:
    """Which controller kinds ship trained weights for this model (the files are there;
    routing/controller.py still refuses a stack made for another shape when it loads)."""
    root = Path(controllers_dir) if controllers_dir is not None else paths.CONTROLLERS_DIR
    return {k: (root / model_slug / k / WEIGHTS_FILE).is_file() for k in KINDS}


def shipped_models(controllers_dir: Path | None = None) -> list[ModelChoice]:
    """The models with controllers shipped under ``controllers_dir`` (default the assets'),
    sorted by id. The model is loaded by the name its ``meta.json`` records: the bundled
    model's name means the bundled default (spec None), any other is a hub id or a path."""
    root = Path(controllers_dir) if controllers_dir is not None else paths.CONTROLLERS_DIR
    out = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        name = None
        for kind in KINDS:
            try:
                meta = json.loads((folder / kind / META_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and isinstance(meta.get("model"), str) and meta["model"]:
                name = meta["model"]
                break
        if name is None or model_id(name) != folder.name:
            log.warning("%s: no meta.json naming the model of this folder; not offered", folder)
            continue
        spec = None if name == BUNDLED_NAME else name
        out.append(ModelChoice(folder.name, spec, name, shipped_trained(folder.name, root)))
    return out


def operator_specs(
    models: str | Iterable[str] | None = None, env: Mapping[str, str] | None = None
) -> list[str]:
    """The model specs the operator passes, in order, without repeats: ``models`` (one spec
    or several, e.g. repeated ``--model``), else ``METAATTN_MODELS`` (comma-separated); then
    ``METAATTN_MODEL`` if set. Blank entries are dropped."""
    env = os.environ if env is None else env
    if models is None:
        given = [s for s in env.get(ENV_MODELS, "").split(",")]
    elif isinstance(models, str):
        given = [models]
    else:
        given = list(models)
    given.append(env.get(MODEL_ENV, ""))  # one model spec (the default model)
    out: list[str] = []
    for spec in given:
        if not isinstance(spec, str):
            raise ValueError(f"a model must be given as text (a folder, .gguf file or hub id), got {spec!r}")
        spec = spec.strip()
        if spec and spec not in out:
            out.append(spec)
    return out


def choice_for_spec(spec: str | None, controllers_dir: Path | None = None) -> ModelChoice:
    """The choice a spec makes, named as routing/loading.py would name it, without loading
    anything. A spec that resolves to nothing still gets a choice (named after the spec):
    loading it then fails with loading's own explanation, shown on the page."""
    sources, _ = resolve(spec)
    if sources:
        name = sources[0].name
    else:
        name = Path(str(spec)).name or str(spec)
    mid = model_id(name)
    return ModelChoice(mid, spec, name, shipped_trained(mid, controllers_dir))


def catalogue(
    models: str | Iterable[str] | None = None,
    env: Mapping[str, str] | None = None,
    controllers_dir: Path | None = None,
) -> list[ModelChoice]:
    """Every model the server offers, the default first: the operator's models in the order
    given (see ``operator_specs``), else the bundled default; then each model with shipped
    controllers not already named. One choice per id (the first spec for an id wins)."""
    specs: list[str | None] = list(operator_specs(models, env)) or [None]
    out: dict[str, ModelChoice] = {}
    for spec in specs:
        c = choice_for_spec(spec, controllers_dir)
        out.setdefault(c.id, c)
    for c in shipped_models(controllers_dir):
        out.setdefault(c.id, c)
    return list(out.values())


# What Generate uses, in a note where the page does not know which model is picked
PICKED_MODEL = "the model picked in the Model list"


def offered_model(name: str | None, choices) -> str | None:
    """The id among the model dropdown's (label, id) `choices` of the model `name` (a
    trace's `model` or a link's: a model's name or its id), or None where the server does
    not offer it. A dropdown refuses a value outside its choices, so only these are set."""
    if not name:
        return None
    ids = [value for _, value in choices]
    for candidate in (name, model_id(name)):
        if candidate in ids:
            return candidate
    return None


def missing_model_note(name: str, choices, current: str | None = None) -> str:
    """What the page says when it cannot put the model `name` that made a run on the
    dropdown: which model Generate uses instead (`current`, the dropdown's value where the
    caller knows it; the only one offered; else the one picked in the Model list)."""
    labels = {value: label for label, value in choices}
    if current is None and len(labels) == 1:
        current = next(iter(labels))
    uses = labels.get(current, current) if current else PICKED_MODEL
    return f"This server does not offer the model {quoted(name)} that made the run; Generate uses {uses}."


__all__ = [
    "ENV_MODELS",
    "PICKED_MODEL",
    "UNTRAINED",
    "ModelChoice",
    "catalogue",
    "choice_for_spec",
    "missing_model_note",
    "model_id",
    "model_label",
    "offered_model",
    "operator_specs",
    "shipped_models",
    "shipped_trained",
]
