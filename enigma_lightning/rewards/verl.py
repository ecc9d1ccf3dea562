"""verl's reward functions as ours: :class:`VerlScore` calls a ``compute_score(data_source, solution_str,
ground_truth, extra_info)`` (verl's ``default_compute_score`` signature, ``verl/utils/reward_score``) once per
completion, as verl's reward manager does, so such a function plugs in unchanged (``conf/reward/verl.yaml``)::

    reward=verl reward.funcs.score.compute_score._target_=mypkg.compute_score allowed_targets=[mypkg]

What it receives, per completion:

- ``data_source``: the row's value of the column named by ``data_source`` (the bundled data's ``type``);
- ``solution_str``: the completion text, assistant prefill included (verl's decoded response);
- ``ground_truth``: the row's value of the column named by ``ground_truth`` (``target``);
- ``extra_info``: a dict of the row's other columns (``source``, ``task``, ...) and ``prompt`` (the rendered prompt).

It may return a number, a bool, ``None`` (unscorable) or a dict with a ``score`` (verl's convention); the dict's other
numeric entries are logged as ``train/reward/<name>/logged/<key>`` (their mean over the step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .xml import answers_match, extract_answer, is_strict


class VerlScore:
    """A verl ``compute_score`` as a reward function (TRL's call signature, text form)."""

    def __init__(self, *, compute_score: Callable, data_source: str, ground_truth: str):
        if not callable(compute_score):
            raise TypeError(f"compute_score must be a function; got {compute_score!r}. Set "
                            "reward.funcs.<name>.compute_score._target_=<module.compute_score> with _partial_: true")
        self.compute_score, self.data_source, self.ground_truth = compute_score, data_source, ground_truth

    def __call__(self, prompts: Sequence, completions: Sequence[str], log_metric: Callable | None = None,
                 **columns) -> list[float | None]:
        columns = {k: v for k, v in columns.items() if k not in ("completion_ids", "trainer_state", "log_extra")}
        for key in ("data_source", "ground_truth"):
            column = getattr(self, key)
            if column not in columns:
                raise KeyError(f"verl compute_score: {key}={column!r} is not a column of the data ({sorted(columns)});"
                               f" set reward.funcs.<name>.{key} to one of them (or map yours with data.columns)")
        out: list[float | None] = []
        extras: dict[str, list[float]] = {}
        for i, completion in enumerate(completions):
            extra_info = {k: v[i] for k, v in columns.items() if k not in (self.data_source, self.ground_truth)}
            extra_info["prompt"] = prompts[i]
            score = self.compute_score(data_source=columns[self.data_source][i], solution_str=completion,
                                       ground_truth=columns[self.ground_truth][i], extra_info=extra_info)
            if isinstance(score, dict):
                if "score" not in score:
                    raise KeyError(f"verl compute_score returned a dict without 'score' ({sorted(score)}); verl "
                                   "reads the reward from its 'score' entry")
                for k, v in score.items():
                    if k != "score" and isinstance(v, int | float) and not isinstance(v, bool):
                        extras.setdefault(k, []).append(float(v))
                score = score["score"]
            out.append(None if score is None else float(score))
        if log_metric is not None:
            for k, v in extras.items():
                log_metric(k, sum(v) / len(v))
        return out


def xml_compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """Our gated correctness in verl's signature (the example ``conf/reward/verl.yaml`` starts from): 1.0 when the
    completion is in the strict XML format and its answer matches ``ground_truth``, else 0.0."""
    return float(is_strict(solution_str) and answers_match(extract_answer(solution_str), ground_truth))
