"""SAMI-style symmetric InfoNCE auxiliary between principles and chains of thought.

Reconstruction (DESIGN section 2): inside GRPO each question's G completions are generated under K principle
variants (G = K * m; the variants are the set's text, its antithesis, and further contrasts), and each completion
remembers its variant. Two critics score completion j against variant i:

- ``logprob`` (SAMI exact): ``S[i, j]`` = mean per-token log-prob of completion j when the prompt carries variant i.
  All K x G cells of a question come from one batched forward (:mod:`enigma_lightning.scoring`; each variant's
  prompt runs once, its KV cache repeated over the G completions), whose diagonal rows give GRPO's log-probs.
- ``encoder``: the frozen principle encoder embeds the K variant texts; a learned linear projection of the policy's
  mean-pooled completion hidden states (last layer) is compared with them by cosine similarity / ``temperature``.
  The projection and the policy train; the encoder does not.

For each question and each r < m the K completions (one per variant) form one K x K matrix; the loss is the
symmetric cross-entropy with diagonal targets and no temperature (SAMI's published loss), averaged over matrices.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..metrics.infonce import infonce_metrics, symmetric_infonce
from .base import StepInputs

CRITICS = ("logprob", "encoder")


class SAMILoss(nn.Module):
    """The SAMI term (``conf/sami/*.yaml``)."""

    name = "sami"
    needs_reference = False

    def __init__(self, weight: float = 0.1, num_variants: int = 2, critic: str = "logprob", temperature: float = 0.1,
                 layer: int = -1, negatives_grad: bool = True):
        super().__init__()
        if critic not in CRITICS:
            raise ValueError(f"sami.critic must be one of {CRITICS}; got {critic!r}")
        self.weight, self.num_variants, self.critic, self.temperature = weight, num_variants, critic, temperature
        # logprob critic: False scores the mismatched (completion, variant) cells without gradient (a stop-gradient
        # on the negatives): the same loss value, half the SAMI backward, but not SAMI's exact gradient
        self.negatives_grad = negatives_grad
        self.layers = [layer]
        self.projection: nn.Linear | None = None

    def setup(self, policy_dim: int, encoder_dim: int | None) -> None:
        """Build the encoder critic's projection (policy hidden size -> encoder embedding size)."""
        if self.critic == "encoder":
            if encoder_dim is None:
                raise ValueError("sami.critic=encoder needs a principle encoder; set encoder=minilm or sami.critic=logprob")
            self.projection = nn.Linear(policy_dim, encoder_dim)

    @property
    def needs_hidden_states(self) -> bool:
        return self.critic == "encoder"

    def matrices(self, inputs: StepInputs) -> Tensor:
        """Score matrices [Q * m, K, K] (rows: prompt variant, columns: completion's variant)."""
        k = self.num_variants
        if self.critic == "logprob":
            s = inputs.extras["sami_scores"]  # [Q, K (prompt variant), K (completion variant), m]
            return s.permute(0, 3, 1, 2).reshape(-1, k, k)
        hidden = inputs.extras["hidden"][self.layers[0]]  # [B, T, D], rows ordered (question, variant, r)
        mask = inputs.completion_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, D]
        z = nn.functional.normalize(self.projection(pooled.float()), dim=-1)  # [B, E]
        e = nn.functional.normalize(inputs.extras["variant_embeddings"].to(z), dim=-1)  # [K, E]
        sims = (z @ e.T) / self.temperature  # [B, K]: completion x variant
        b = sims.size(0)
        m = b // (inputs.extras["num_questions"] * k)
        sims = sims.view(-1, k, m, k)  # [Q, completion variant, r, prompt variant]
        return sims.permute(0, 2, 3, 1).reshape(-1, k, k)

    def forward(self, inputs: StepInputs) -> tuple[Tensor, dict[str, Tensor]]:
        s = self.matrices(inputs)
        metrics = infonce_metrics(s)
        metrics.pop("loss")
        return symmetric_infonce(s), metrics
