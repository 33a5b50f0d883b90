"""Which weights a controller belongs to: the fingerprint of the loaded weights against the
one recorded in the controller's meta.json, and the notice a mismatch produces."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import CharTokenizer, routed_tiny, tiny_model

from metaattn_viz.routing.controller import ControllerStack
from metaattn_viz.routing.fingerprint import weights_fingerprint
from metaattn_viz.routing.model import RoutedModel


def test_the_fingerprint_tells_weights_apart_and_ignores_how_they_are_held():
    model = tiny_model(seed=0)
    same = copy.deepcopy(model)
    assert weights_fingerprint(model) == weights_fingerprint(same)
    assert weights_fingerprint(model) != weights_fingerprint(tiny_model(seed=1))
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-6  # one number of one tensor
    assert weights_fingerprint(model) != weights_fingerprint(same)


def test_bfloat16_copies_of_float32_weights_are_other_weights():
    model = tiny_model(seed=0)
    assert weights_fingerprint(model) != weights_fingerprint(copy.deepcopy(model).to(torch.bfloat16))


def _routed_with_recorded(tmp_path, recorded: str | None) -> RoutedModel:
    routed = routed_tiny()
    meta = {} if recorded is None else {"weights_fingerprint": recorded}
    stack = routed.controller("bayes")
    stack.save(tmp_path / "bayes", meta)  # through the file, as shipped controllers are
    loaded = ControllerStack.load(tmp_path / "bayes")
    controllers = {"bayes": loaded, "priorfree": routed.controller("priorfree")}
    routed.detach()  # a model is routed by one RoutedModel at a time
    return RoutedModel(
        routed.model,
        CharTokenizer(),
        controllers,
        "tiny",
        weights_fingerprint=weights_fingerprint(routed.model),
    )


def test_controllers_calibrated_on_other_weights_get_the_notice(tmp_path):
    routed = _routed_with_recorded(tmp_path, "0" * 32)
    notice = routed.weights_notice("bayes")
    assert notice is not None and "calibrated on another copy of these weights" in notice


def test_controllers_calibrated_on_these_weights_get_none(tmp_path):
    routed = routed_tiny()
    recorded = weights_fingerprint(routed.model)
    assert _routed_with_recorded(tmp_path, recorded).weights_notice("bayes") is None
    # untrained controllers are labelled as untrained, not as calibrated elsewhere
    assert _routed_with_recorded(tmp_path, recorded).weights_notice("priorfree") is None


def test_controllers_without_a_recorded_fingerprint_say_so(tmp_path):
    notice = _routed_with_recorded(tmp_path, None).weights_notice("bayes")
    assert notice == "these controllers do not record which weights they were calibrated on"


@pytest.mark.slow
def test_the_shipped_controllers_match_the_bundled_gguf(real_model):
    from metaattn_viz.routing.controller import default_folder

    assert real_model.loaded_from in ("cache", "gguf")
    assert real_model.weights_fingerprint == weights_fingerprint(real_model.model)
    for kind in ("bayes", "priorfree"):
        meta = json.loads((default_folder(real_model.slug, kind) / "meta.json").read_text())
        assert meta["weights_fingerprint"] == real_model.weights_fingerprint, kind
    with RoutedModel.from_loaded(real_model) as routed:  # the shared model is routed once
        assert routed.weights_notice("bayes") is None and routed.weights_notice("priorfree") is None
