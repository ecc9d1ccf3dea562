"""The loss-term contract: what a term declares it needs from the training step, what it receives, what it returns.

A term is a :class:`LossTerm` subclass plus one YAML file in ``conf/loss/`` (see ``conf/loss/ot.yaml``): selecting
it (``loss=[grpo,<name>]``) puts its settings under the top-level key ``<name>`` (``ot.epsilon=0.05``) and its name
under ``loss``. The step (:mod:`enigma_lightning.step.module`) never names a term. It asks every selected term for its
:class:`Needs`, computes their union once (one policy forward, at most one reference forward, the principle
embeddings, the extra scored rows) and hands each term a :class:`StepBatch`; the term returns ``(loss, metrics)``,
metric names relative to ``train/<name>/``. The objective is the sum of ``weight * loss`` over the selected terms.

Hooks, all optional (the defaults do nothing):

- :meth:`LossTerm.needs`: a :class:`Needs` (typed: no other attribute of a term is read by the step).
- :meth:`LossTerm.setup`: called once with the policy's hidden size and the principle encoder's width, to build
  parameters (they train with the policy and are saved in checkpoints).
- :meth:`LossTerm.scored_rows`: extra (prompt row, completion row) pairs for the policy forward, e.g. SAMI's K x K
  cells; their log-probs arrive as ``StepBatch.scored[name]``. Rows that include the step's own pairs (``own``) make
  that forward serve the step too, so nothing runs twice.
- :meth:`LossTerm.prepare`: receives the step's policy forward (:data:`Forward`) and the batch before the loss; what
  it returns arrives as ``StepBatch.prepared[name]`` and its time is logged as ``perf/prepare/<name>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn

# forward(rows=(prompt rows, completion rows) | None, num_generations=n, hidden=bool, compute_logps=bool)
#   -> (log-probs [R, T] | None, {layer: hidden states [R, T, D]}); rows=None: the rollout's own rows. Each prompt row
#   must repeat n times in a row (those rows share one prompt forward); the distinct prompts are the rollout's.
Forward = Callable[..., tuple[Tensor | None, dict[int, Tensor]]]


@dataclass(frozen=True)
class Needs:
    """What a term needs from the step. The step computes the union over the selected terms, once."""

    reference_logps: bool = False  # the frozen reference's per-token log-probs (StepBatch.ref_logps)
    hidden_layers: tuple[int, ...] = ()  # policy hidden states of these layers (StepBatch.hidden), indices into
    #                                      the model's hidden_states (-1 = last)
    reference_hidden_layers: tuple[int, ...] = ()  # the reference's, on the same completions (StepBatch.ref_hidden)
    num_variants: int = 1  # K: each question's completions are sampled under K principle variants (G = K * m)
    principle_embeddings: bool = False  # the principle encoder's embeddings of the K variants
    scored_rows: bool = False  # extra rows in the policy forward (LossTerm.scored_rows)
    global_token_count: bool = False  # StepBatch.num_items_in_batch: completion tokens over all ranks / world size

    @property
    def reference(self) -> bool:
        return self.reference_logps or bool(self.reference_hidden_layers)

    def union(self, other: Needs) -> Needs:
        if 1 < self.num_variants != other.num_variants > 1:
            raise ValueError(f"two loss terms ask for different numbers of principle variants "
                             f"({self.num_variants} and {other.num_variants}); set them equal")
        return Needs(
            reference_logps=self.reference_logps or other.reference_logps,
            hidden_layers=tuple(sorted({*self.hidden_layers, *other.hidden_layers})),
            reference_hidden_layers=tuple(sorted({*self.reference_hidden_layers, *other.reference_hidden_layers})),
            num_variants=max(self.num_variants, other.num_variants),
            principle_embeddings=self.principle_embeddings or other.principle_embeddings,
            scored_rows=self.scored_rows or other.scored_rows,
            global_token_count=self.global_token_count or other.global_token_count,
        )


@dataclass(frozen=True)
class Layout:
    """How a rollout's rows are ordered: question q, then variant i < K, then r < m (completion j = i * m + r of
    question q was sampled under variant i; G = K * m completions per question)."""

    num_questions: int
    num_variants: int  # K
    num_generations: int  # G

    @property
    def per_variant(self) -> int:  # m
        return self.num_generations // self.num_variants


@dataclass(frozen=True)
class ScoredRows:
    """Extra rows a term wants scored by the policy forward: completion ``completion_rows[r]`` after the prompt of
    row ``prompt_rows[r]`` (indices into the rollout's rows). Each prompt row repeats ``num_generations`` times in a
    row. ``own`` [B]: where the rollout's own (prompt, completion) pairs sit among these rows, when they all do; the
    step then takes its log-probs and hidden states from this forward instead of running its own. ``grad=False``
    scores without gradient (a forward of its own, without hidden states)."""

    prompt_rows: Tensor  # [R]
    completion_rows: Tensor  # [R]
    num_generations: int
    own: Tensor | None = None  # [B]
    grad: bool = True


@dataclass
class StepBatch:
    """Everything a term may read in one training step. B = completions in the step, T = completion length (right
    padded). Fields a term did not declare in its :class:`Needs` are None or empty."""

    prompt_ids: Tensor  # [B, P] left padded
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T] the loss mask: 1 up to and including the first EOS (0 for masked truncated
    #                          completions, step.mask_truncated_completions)
    eos_mask: Tensor  # [B, T] 1 up to and including the first EOS, truncated completions included
    advantages: Tensor  # [B]
    logps: Tensor  # [B, T] policy per-token log-probs (with grad)
    layout: Layout
    old_logps: Tensor | None = None  # [B, T] log-probs of the policy that sampled (None: on-policy, = logps.detach())
    ref_logps: Tensor | None = None  # [B, T] frozen reference log-probs
    hidden: dict[int, Tensor] = field(default_factory=dict)  # {layer: [B, T, D]} policy hidden states (with grad)
    ref_hidden: dict[int, Tensor] = field(default_factory=dict)  # {layer: [B, T, D]} the reference's (no grad)
    principle_embeddings: Tensor | None = None  # [K, E] the principle encoder's embeddings of the variants
    scored: dict[str, Tensor] = field(default_factory=dict)  # term name -> log-probs [R, T] of its ScoredRows
    prepared: dict[str, Any] = field(default_factory=dict)  # term name -> what its prepare hook returned
    num_items_in_batch: Tensor | None = None  # completion tokens in the global batch (dapo normaliser)
    max_completion_length: int | None = None  # the rollout's max_new_tokens (dr_grpo normaliser)
    step: int = 0  # the optimiser step (seeds subsampling)
    sampling_logps: Tensor | None = None  # [B, T] the rollout engine's log-probs of its samples (None: the policy's
    #                                       own generate sampled; rollout/engine=vllm sets them)
    sampling_exact: bool = True  # the engine computes in the policy's precision (its log-probs are the policy's)
    gather: Callable[[Tensor], Tensor] | None = None  # [N_r, ...] -> every rank's rows in rank order (the one-process
    #   order), its gradient flowing back to this rank's rows and scaled so that the ranks' averaged gradients are the
    #   one-process gradient; None on one process. A term coupling all completions of the step (OT) calls it on every
    #   rank, every step

    def replace(self, **changes) -> StepBatch:
        return replace(self, **changes)


class LossTerm(nn.Module):
    """A term of the ENIGMA objective (see the module docstring). Subclasses set ``name``, take ``weight`` and
    implement :meth:`forward`; the other hooks are optional."""

    name: str = ""

    def __init__(self, *, weight: float):
        super().__init__()
        self.weight = float(weight)

    def needs(self) -> Needs:
        return Needs()

    def setup(self, *, hidden_size: int, encoder_dim: int | None) -> None:
        """Build parameters once the policy (and the principle encoder, if any) is known."""

    def scored_rows(self, layout: Layout, device) -> ScoredRows | None:
        return None

    def prepare(self, forward: Forward, batch: StepBatch) -> Any:
        return None

    def forward(self, batch: StepBatch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


def layer_exists(layer: int, num_layers: int) -> bool:
    """Index ``layer`` into ``hidden_states`` (the embeddings, then one per decoder layer) of a model with
    ``num_layers`` decoder layers."""
    return -(num_layers + 1) <= layer <= num_layers


def hidden_states_text(num_layers: int) -> str:
    return f"{num_layers + 1} hidden states (0 = embeddings .. {num_layers}, or -{num_layers + 1} .. -1)"


def check_layers(terms: dict[str, LossTerm], config, model: str) -> None:
    """Every hidden-state layer a term asks for exists in the loaded policy (``config``: its transformers config);
    otherwise a ValueError naming the term's settings and the range. Runs once the policy is loaded, for models
    whose layer count the configuration check could not know beforehand (a hub id not in the local cache)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int):
        return
    for name, term in terms.items():
        needs = term.needs()
        bad = sorted({x for x in (*needs.hidden_layers, *needs.reference_hidden_layers) if not layer_exists(x, n)})
        if bad:
            raise ValueError(f"{name}.* asks for hidden-state layers {bad}, which {model} does not have: it has "
                             f"{hidden_states_text(n)}. Set {name}'s layer setting within that range (-1 = the last "
                             "layer)")
