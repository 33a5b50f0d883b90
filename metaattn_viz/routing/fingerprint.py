"""Which weights a controller belongs to: a content fingerprint of a model's parameters.

Controllers are calibrated on one copy of a model's weights (the bundled Q4_1 GGUF,
dequantised to float32). Another copy of "the same" model (the hub's bfloat16 safetensors,
another quantisation) routes differently, so `meta.json` records the fingerprint of the
weights calibration saw, and loading compares it with the weights actually loaded
(docs/method.md, "Choices this project made"). Never changes the model.
"""

from __future__ import annotations

import hashlib

import torch

FINGERPRINT_KIND = "blake2b-128/float32-state-dict/v1"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer of `model` (names, shapes and float32 values),
    independent of the device and of the dtype the weights are held in: the same numbers
    in bfloat16 and float32 hash alike only if their float32 values are equal."""
    h = hashlib.blake2b(digest_size=16)
    h.update(FINGERPRINT_KIND.encode())
    state = model.state_dict()
    seen: set[int] = set()
    for name in sorted(state):
        t = state[name]
        if t.data_ptr() in seen and t.numel():  # tied weights (embeddings): hash once
            h.update(f"{name}=tied".encode())
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}:{tuple(t.shape)}".encode())
        data = t.detach().to("cpu", torch.float32).contiguous()
        h.update(data.numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def fingerprint_notice(recorded: str | None, loaded: str) -> str | None:
    """The notice to show when the controllers were calibrated on other weights, else None.
    Controllers from before fingerprints were recorded say so too."""
    if recorded is None:
        return "these controllers do not record which weights they were calibrated on"
    if recorded != loaded:
        return "calibrated on another copy of these weights: routing may differ from docs/results.md"
    return None
