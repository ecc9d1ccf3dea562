"""The one door to transformers internals: every use of non-public transformers API in the package is here.

Each function or class names the public behaviour it relies on. What lives here:

- KV cache layers (``transformers.cache_utils.DynamicLayer``, whose ``keys``/``values``/``update`` are the cache's
  documented extension point but whose class is internal): :class:`ReservedLayer` (written in place while sampling,
  instead of grown by concatenation) and :class:`ReadOnlyLayer` (a prompt's cache that checkpointed layers read and
  never extend); :func:`select_rows`, :func:`fork_cache`, :func:`default_cache`.
- The cache keyword of ``forward``/``generate`` (``cache`` from transformers 5.24, ``past_key_values`` before):
  :func:`cache_argument`, :func:`output_cache`.
- The decoder's final norm, for the logit lens (:func:`final_norm`: the ``norm`` attribute transformers' decoder
  classes give it, which is no public API).
- Activation checkpointing switches (``GradientCheckpointingLayer`` and its private ``_can_checkpoint_with_cache``,
  the ``gradient_checkpointing`` attribute of models and layers): :func:`checkpointing`,
  :func:`enable_checkpointing`, :func:`checkpoint_layers`, :func:`unchecked`, :func:`layers_read_cache`.

The supported transformers releases are declared in ``pyproject.toml``; CI runs the tests on the oldest and the newest
(``nox -s transformers``).

:class:`ReservedLayer`: transformers' ``DynamicLayer`` appends each decoding step's keys and values with ``torch.cat``,
which copies the whole cache of every layer at every step: for the embedded default (16 rows, ~300 cached tokens, 30
layers) about 13% of a decoding step on CPU. It keeps a buffer with room for the tokens still to come, writes each
step into it and returns views of the filled part. Attention reads the same values, so sampling is unchanged (the
tests compare the tokens); only the copies go. For inference only: it writes in place, which autograd must not see.

:class:`ReadOnlyLayer` is for training under activation checkpointing: a prompt's cache that the completion forward
reads and never extends, so a checkpointed layer's replay in the backward sees the same cache as its first run.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from ..errors import EnigmaError


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
    if not isinstance(cache, DynamicCache):
        return cache
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


def default_cache(model: nn.Module):
    """The cache ``generate`` would build for ``model`` by itself (a ``DynamicCache`` from its config), or None when
    the model builds another kind (encoder-decoders; models without transformers' private
    ``_supports_default_dynamic_cache``, e.g. those with a cache class of their own)."""
    if getattr(model.config, "is_encoder_decoder", False) \
            or not getattr(model, "_supports_default_dynamic_cache", lambda: False)():
        return None
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def select_rows(cache, rows: list[int], index: Tensor) -> None:
    """``cache.batch_select_indices(rows)`` for row indices held on the host, with a backward that gives the same
    gradients every time: each run of equal indices is its row expanded (whose gradient is a sum over the run, in
    order) and the runs are concatenated. Indexing's backward instead adds the copies' gradients into the shared row
    with atomic adds across threads on CPU, in whatever order the threads reach them, so the last bits of the prompt
    keys' and values' gradients changed from call to call. Layers of other kinds keep their own selection, given
    ``index`` (``rows`` as a tensor on the cache's device)."""
    runs = [(row, len(list(same))) for row, same in itertools.groupby(rows)]

    def pick(t: Tensor) -> Tensor:
        return torch.cat([t[row : row + 1].expand(n, *t.shape[1:]) for row, n in runs])

    for layer in cache.layers:
        if type(layer).batch_select_indices is not DynamicLayer.batch_select_indices:
            layer.batch_select_indices(index)
        elif layer.get_seq_length() > 0:
            layer.keys, layer.values = pick(layer.keys), pick(layer.values)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a decoder applies after its last layer (``get_decoder().norm`` in transformers' Llama, Qwen2, Gemma3,
    ... classes; None where a model names it otherwise): the logit lens applies it before the unembedding, as the
    model's own forward does."""
    return getattr(model.get_decoder(), "norm", None)


def cache_argument(model) -> str:
    """The keyword under which ``model``'s forward, and ``generate``, take a KV cache: ``cache`` from transformers 5.24
    on (``past_key_values`` is deprecated there, to be removed in 5.40), ``past_key_values`` before, and for models
    whose own code still names it so. Read from the forward's signature (a peft wrapper's: its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a model's forward returned, under whichever name its output class gives it."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return out.cache if "cache" in fields else out.past_key_values


def fork_cache(cache):
    """A copy of a KV cache that shares its tensors: caches replace their tensors rather than write into them
    (``update`` concatenates, ``batch_select_indices`` indexes), so the original stays as it was."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


def checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on (transformers then drops the KV cache in training)."""
    # newer transformers name the flag is_activation_checkpointing (the old name warns); a peft wrapper forwards
    # either to its base model
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft building a ``PeftModel``: peft reads the checkpointing flag by transformers' deprecated name
    (``is_gradient_checkpointing``, a FutureWarning on every LoRA run); that one warning is hushed, no other."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def enable_checkpointing(model: nn.Module, every_n_layers: int = 1) -> None:
    """Non-reentrant activation checkpointing of decoder layers 0, n, 2n, ... (the other layers keep their
    activations: faster, more memory). Non-reentrant, so gradients reach a KV cache passed into a checkpointed layer
    (:mod:`enigma_lightning.rollout.prefix` relies on it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable is its deprecated alias
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif "every_n_layers" in inspect.signature(model.gradient_checkpointing_enable).parameters:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:
        raise EnigmaError("model.checkpoint_every_n_layers > 1 needs a transformers release whose checkpointing "
                          "takes every_n_layers; upgrade transformers or set model.checkpoint_every_n_layers=1.")
    model.config.use_cache = False


def checkpoint_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers activation checkpointing wraps in ``model`` (none when it is off), or None when a shared prompt
    cache cannot pass through them: checkpointing done otherwise than by transformers' ``GradientCheckpointingLayer``,
    or attention layers whose cache is not a plain full-attention ``DynamicLayer`` (sliding windows, ...)."""
    if not checkpointing(model):
        return []
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    config = getattr(model, "config", None)
    if not layers or config is None:
        return None
    try:
        probe = DynamicCache(config=config.get_text_config(decoder=True))
    except Exception:  # a config transformers cannot read the layer kinds from
        return None
    return layers if all(type(layer) is DynamicLayer for layer in probe.layers) else None


@contextmanager
def unchecked(model: nn.Module) -> Iterator[None]:
    """Checkpointing off in ``model`` for the block (the prompts' forward, whose cache must be kept): in its layers,
    and in the models that hold them (which otherwise turn ``use_cache`` off)."""
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in on:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in on:
            m.gradient_checkpointing = True


@contextmanager
def layers_read_cache(layers: list[nn.Module]) -> Iterator[None]:
    """Checkpointed ``layers`` keep the cache they are given for the block (transformers' switch for layers that only
    read it): pass a :func:`~enigma_lightning.kvcache.read_only` cache."""
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            vars(m).pop("_can_checkpoint_with_cache", None)
