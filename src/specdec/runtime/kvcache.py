"""A preallocated KV cache that keeps exactly the accepted path.

transformers' DynamicCache concatenates on every forward, copying the whole cache each step; here each layer
owns one buffer sized for prompt + max_new_tokens + a tree, a forward writes its tokens after the committed
length, and `commit` keeps only the accepted tree nodes: a no-op when they are already contiguous (a chain
accepted up to some depth), otherwise one gather per layer. Rolling back is moving the length.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Layer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        # [B, H, capacity, D]
        self.k_buf = key_states.new_empty(b, h, self.capacity, d)  # slots past `length` are never read
        self.v_buf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        for name in ("k_buf", "v_buf"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], new_cap, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = new_cap

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [B, H, T, D] for the T tokens of this forward
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        assert self.k_buf is not None and self.v_buf is not None  # allocated by lazy_initialization
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0

    def crop(self, length: int) -> None:
        self.length = length

    def keep(self, start: int, offsets: torch.Tensor) -> None:
        """Keep slots start+offsets (ascending) at start, start+1, ...; drop everything after them."""
        if not self.is_initialized:
            return
        assert self.k_buf is not None and self.v_buf is not None  # allocated when initialized
        src = offsets + start
        n = offsets.numel()
        # Gather first (index_select makes a temporary), so overlapping source/destination slots are safe.
        self.k_buf[:, :, start : start + n] = self.k_buf.index_select(2, src)
        self.v_buf[:, :, start : start + n] = self.v_buf.index_select(2, src)
        self.length = start + n


class KVCache(Cache):
    """One `_Layer` per decoder layer; passed to the model as `past_key_values`."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[_Layer(capacity) for _ in range(num_layers)])

    @property
    def _layers(self) -> list[_Layer]:
        return cast("list[_Layer]", self.layers)  # built from _Layer only, above

    @property
    def length(self) -> int:
        return self._layers[0].length

    def crop(self, length: int) -> None:  # transformers' crop takes a negative count; ours an absolute length
        if length < 0:
            length = self.length + length
        for layer in self._layers:
            layer.crop(length)

    def keep(self, start: int, offsets: list[int]) -> None:
        """After a tree forward written at `start`: keep the nodes at `offsets` (ascending), drop the rest."""
        if offsets == list(range(len(offsets))):  # already contiguous: rolling back is moving the length
            self.crop(start + len(offsets))
            return
        k0 = self._layers[0].k_buf
        assert k0 is not None, "keep() follows a forward, which allocates the buffers"
        idx = torch.tensor(offsets, dtype=torch.long, device=k0.device)
        for layer in self._layers:
            layer.keep(start, idx)

    def tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, length, D] views of one layer's committed keys and values (for tests and inspection)."""
        lay = self._layers[layer]
        assert lay.k_buf is not None and lay.v_buf is not None, "no forward has written this cache yet"
        return lay.k_buf[:, :, : lay.length], lay.v_buf[:, :, : lay.length]
