"""Named reward functions with weights, combined as TRL's ``sum_then_normalize`` does (before group advantages).

Each function is called as TRL's ``GRPOTrainer`` calls it (``_calculate_rewards``): ``prompts``, ``completions``,
``completion_ids`` (each completion's token ids up to and including EOS, padding dropped), ``trainer_state`` (a
``transformers.TrainerState``: ``global_step``, ``max_steps``, ``epoch``), ``log_metric(name, value)`` and
``log_extra(column, values)``, and the dataset's columns (``source``, ``target``, ``task``, ...), one value per
completion. A function without ``**kwargs`` receives only the arguments it names.

Our prompts are chat prompts, which TRL would pass in its conversational form. Two forms, chosen per function:

- text (default; what ``enigma_lightning.rewards.*`` take): ``prompts`` are the rendered prompt strings (chat
  template applied, assistant prefill included) and ``completions`` the decoded strings with the prefill
  prepended: TRL's standard form.
- conversational (functions named in ``reward.conversational``, e.g. ``trl.rewards.think_format_reward``):
  ``prompts`` are the chat messages (system, worked example turns, user) and each completion is
  ``[{"role": "assistant", "content": prefill + text}]``: TRL's conversational form.

``completion_ids`` never hold the prefill (it is part of the prompt's tokens).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .xml import RewardFn

TRL_KWARGS = ("completion_ids", "trainer_state", "log_metric", "log_extra")


def _accepted(fn) -> set[str] | None:
    """The keyword names ``fn`` takes, or None when it takes ``**kwargs`` (or cannot be inspected)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def token_lists(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """What TRL passes as ``completion_ids``: each row's ids where ``mask`` is 1 (up to and including EOS)."""
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]


def trainer_state(global_step: int, max_steps: int, epoch: float):
    """What TRL passes as ``trainer_state``: a ``transformers.TrainerState`` with the run's progress."""
    from transformers import TrainerState

    return TrainerState(global_step=int(global_step), max_steps=int(max_steps), epoch=float(epoch))


class RewardModel:
    """Named reward functions with weights; combines them the way TRL's ``sum_then_normalize`` does."""

    def __init__(self, funcs: Mapping[str, RewardFn], weights: Mapping[str, float] | None = None, *,
                 conversational: Sequence[str]):
        if not funcs:
            raise ValueError("reward.funcs is empty; add at least one reward function.")
        self.names = list(funcs)
        self.funcs = [funcs[n] for n in self.names]
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"reward.weights names {unknown}, which are not in reward.funcs {self.names}.")
        unknown = sorted(set(conversational or ()) - set(self.names))
        if unknown:
            raise ValueError(f"reward.conversational names {unknown}, which are not in reward.funcs {self.names}.")
        self.conversational = set(conversational or ())
        self.accepts = [_accepted(f) for f in self.funcs]
        self.weights = torch.tensor([float(weights.get(n, 1.0)) for n in self.names])
        self.last_nonfinite: dict[str, int] = {}  # per function: values of the last call that were NaN or inf
        self.last_logged: dict[tuple[str, str], float] = {}  # (function, name): mean of what log_metric got last call
        self.last_extra: dict[str, list] = {}  # columns the functions passed to log_extra in the last call

    def __call__(self, prompts: Sequence, completions: Sequence[str], *, completion_ids: Sequence | None = None,
                 trainer_state: Any = None, prompt_messages: Sequence | None = None,
                 **columns) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(per_func [N, F] with NaN for None, total [N])``; total is NaN where every function gave None.
        ``prompt_messages``: the chat messages of each prompt, for the functions that take the conversational form."""
        cols, self.last_nonfinite, self.last_extra = [], {}, {}
        logged: dict[tuple[str, str], list[float]] = defaultdict(list)
        messages = None
        for name, fn, accepts in zip(self.names, self.funcs, self.accepts, strict=True):
            conv = name in self.conversational
            if conv:
                if prompt_messages is None:
                    raise ValueError(f"reward function {name!r} is in reward.conversational, but the caller has no "
                                     "chat messages for the prompts; remove it from reward.conversational")
                messages = messages or [[{"role": "assistant", "content": c}] for c in completions]
            kwargs = {"prompts": prompt_messages if conv else prompts, "completions": messages if conv else completions,
                      "completion_ids": completion_ids, "trainer_state": trainer_state,
                      "log_metric": lambda key, value, _n=name: logged[_n, str(key).replace("/", "_")].append(float(value)),
                      "log_extra": lambda column, values: self.last_extra.__setitem__(column, list(values)),
                      **columns}
            if accepts is not None:
                kwargs = {k: v for k, v in kwargs.items() if k in accepts}
            try:
                values = fn(**kwargs)
            except TypeError as e:  # "string indices must be integers": completion[0]["content"] on a string
                if conv or "string indices" not in str(e):
                    raise
                raise TypeError(f"reward function {name!r} failed on text completions ({type(e).__name__}: {e}). If it "
                              "is written for TRL's conversational form (completions as lists of messages, as "
                              f"trl.rewards.think_format_reward), name it in reward.conversational: "
                              f"reward.conversational=[{name}]") from e
            if len(values) != len(completions):
                raise ValueError(f"reward function {name!r} returned {len(values)} values for {len(completions)}.")
            cols.append([math.nan if v is None else float(v) for v in values])
            bad = sum(v is not None and not math.isfinite(float(v)) for v in values)  # None: unscorable, not bad
            if bad:
                self.last_nonfinite[name] = bad
        self.last_logged = {name_key: sum(v) / len(v) for name_key, v in logged.items()}
        per_func = torch.tensor(cols, dtype=torch.float32).T.reshape(len(completions), len(self.names))
        total = (per_func * self.weights.unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(per_func).all(dim=1)] = math.nan
        return per_func, total
