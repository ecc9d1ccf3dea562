"""A KV cache for sampling that is written in place instead of grown by concatenation.

transformers' ``DynamicLayer`` appends each decoding step's keys and values with ``torch.cat``, which copies the whole
cache of every layer at every step: for the embedded default (16 rows, ~300 cached tokens, 30 layers) about 13% of a
decoding step on CPU. :class:`ReservedLayer` keeps a buffer with room for the tokens still to come, writes each step
into it and returns views of the filled part. Attention reads the same values, so sampling is unchanged (the tests
compare the tokens); only the copies go. For inference only: it writes in place, which autograd must not see.

:class:`ReadOnlyLayer` is for training under activation checkpointing: a prompt's cache that the completion forward
reads and never extends, so a checkpointed layer's replay in the backward sees the same cache as its first run.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` that keeps ``reserve`` tokens of room: an update that fits is written in place.

    ``keys``/``values`` are views of the buffer. Anything that replaces them (``crop``, ``batch_select_indices``,
    ``reorder_cache``, ...) is picked up at the next update, which copies them into a new buffer.

    The buffer's length is rounded up to a multiple of ``granularity`` tokens, so that rollouts whose prompts differ
    in length by a few tokens hand attention views of the same strides. cuDNN's attention (torch's first choice on
    recent GPUs) builds an execution plan for each new combination of shapes and strides and caches it: a buffer
    sized exactly to each batch's prompt length gave every decoding step of every rollout a new stride, so a new
    plan."""

    granularity = 64

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._view: torch.Tensor | None = None  # the keys view last handed out

    @classmethod
    def adopt(cls, layer: DynamicLayer, reserve: int) -> ReservedLayer:
        """The same cached keys and values, with room for ``reserve`` more tokens (allocated at the next update)."""
        return _adopt(cls(reserve), layer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if self._buffers is None or self.keys is not self._view or n + new > self._buffers[0].shape[-2]:
            size = -(-(n + new + self.reserve) // self.granularity) * self.granularity
            k = key_states.new_empty((*key_states.shape[:-2], size, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:-2], size, value_states.shape[-1]))
            if n:
                k[..., :n, :].copy_(self.keys)
                v[..., :n, :].copy_(self.values)
            self._buffers = k, v
        k, v = self._buffers
        k[..., n : n + new, :].copy_(key_states)
        v[..., n : n + new, :].copy_(value_states)
        self.keys = self._view = k[..., : n + new, :]
        self.values = v[..., : n + new, :]
        return self.keys, self.values


def _adopt(new: DynamicLayer, layer: DynamicLayer) -> DynamicLayer:
    """``new`` holding ``layer``'s state: keys, values, dtype, device, is_initialized (a DynamicLayer has no other)."""
    vars(new).update(vars(layer))
    return new


def reserve(cache, tokens: int):
    """Give each full-attention layer of ``cache`` (a ``DynamicCache``), and each such layer it creates later, room for
    ``tokens`` more tokens; other layer kinds (sliding windows, ...) are left as they are. Returns the cache."""
    cache.layers = [ReservedLayer.adopt(layer, tokens) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = partial(ReservedLayer, tokens)
    return cache


class ReadOnlyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``update`` returns the cached keys and values followed by the new ones and keeps
    nothing: the cache stays the prompt's however often a layer runs (once, and again when activation checkpointing
    recomputes it). Gradients flow into the cached tensors as through ``DynamicLayer``'s concatenation."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_only(cache) -> bool:
    """Make every layer of ``cache`` (a filled ``DynamicCache``) a :class:`ReadOnlyLayer`, in place. False, and the
    cache left as it is, when a layer is of another kind (sliding window, ...) or empty."""
    if not cache.layers or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers):
        return False
    cache.layers = [_adopt(ReadOnlyLayer(), layer) for layer in cache.layers]
    return True
