"""A key/value cache that appends in place: what decoding reads instead of transformers'
DynamicCache.

DynamicCache grows by `torch.cat`, so every decode step copies the whole cache of every
layer (read + write) before attention reads it again; at an 8192-token context that copy is
2/3 of the KV traffic of a step and is paid whatever the attention then reads. Here each
layer keeps a buffer with spare capacity (sized for prompt + new tokens when known,
otherwise grown by doubling), new keys are written into it, and attention gets views
[B, Hkv, :n, D] of the buffer: a full-attention step reads the cache once, a local step
reads its window, a linear step none of it.

Both sides of every routed-vs-dense comparison (bench_model) use this cache.

Never: change what attention sees (the views hold exactly the keys DynamicCache would).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

MIN_CAPACITY = 256


class GrowableLayer(DynamicLayer):
    """One layer: keys/values are views of a buffer with room to grow."""

    def __init__(self, capacity: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.capacity_hint = int(capacity)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def _owns_views(self) -> bool:
        """Whether keys/values are still views of our buffers (crop keeps them; the batch
        reorderings of DynamicLayer replace them with fresh tensors)."""
        kbuf, vbuf, keys, values = self._kbuf, self._vbuf, self.keys, self.values
        return (
            kbuf is not None
            and vbuf is not None
            and keys is not None
            and values is not None
            and keys.numel() > 0
            and keys.data_ptr() == kbuf.data_ptr()
            and keys.shape[:2] == kbuf.shape[:2]
            and values.data_ptr() == vbuf.data_ptr()
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        new = key_states.shape[-2]
        need = n + new
        kbuf, vbuf = self._kbuf, self._vbuf
        owns = self._owns_views()
        if (
            kbuf is None
            or vbuf is None
            or not owns
            or need > kbuf.shape[-2]
            or kbuf.dtype != key_states.dtype
        ):
            cap = max(need, self.capacity_hint, MIN_CAPACITY)
            if kbuf is not None and owns:
                cap = max(cap, 2 * kbuf.shape[-2])
            b, h, _, d = key_states.shape
            kbuf = key_states.new_empty(b, h, cap, d)
            vbuf = value_states.new_empty(b, h, cap, value_states.shape[-1])
            if n:
                assert self.keys is not None and self.values is not None  # n keys are held
                kbuf[:, :, :n].copy_(self.keys)
                vbuf[:, :, :n].copy_(self.values)
            self._kbuf, self._vbuf = kbuf, vbuf
        kbuf[:, :, n:need].copy_(key_states)
        vbuf[:, :, n:need].copy_(value_states)
        keys, values = kbuf[:, :, :need], vbuf[:, :, :need]
        self.keys, self.values = keys, values
        return keys, values

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


class GrowableCache(DynamicCache):
    """A DynamicCache (to every check transformers makes) of GrowableLayer; ``capacity``
    (tokens) sizes the first buffer of each layer, e.g. prompt length + max new tokens."""

    def __init__(self, capacity: int = 0):
        # transformers only calls layer_class_to_replicate(): a factory serves as the class
        Cache.__init__(self, layer_class_to_replicate=lambda: GrowableLayer(capacity))  # type: ignore[arg-type]
