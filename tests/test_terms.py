"""The loss-term contract: a term written outside the package is one class plus one YAML file in a `loss/` config
folder, selected as loss=[grpo,<name>], with no edit to the step, train.yaml or validation; the step gives it exactly
what its Needs declare; every term's settings override under its own name."""

import torch
from hydra.utils import instantiate

from enigma_lightning.losses.base import LossTerm, Needs, StepBatch

SEEN: list[dict] = []


class EntropyBonus(LossTerm):
    """Rewards spread-out next-token distributions: the mean sampled-token log-prob is a Monte Carlo estimate of minus
    the policy's entropy, so minimising it raises the entropy. Reads the reference (log-probs and a hidden layer) only
    to prove the step hands a new term what it declares, with grpo.beta=0."""

    name = "entropy"

    def __init__(self, *, weight: float, layer: int):
        super().__init__(weight=weight)
        self.layer = layer

    def needs(self) -> Needs:
        return Needs(reference_logps=True, hidden_layers=(self.layer,), reference_hidden_layers=(self.layer,))

    def forward(self, batch: StepBatch):
        SEEN.append({"ref_logps": batch.ref_logps, "hidden": dict(batch.hidden), "ref_hidden": dict(batch.ref_hidden)})
        mask = batch.completion_mask.to(batch.logps.dtype)
        neg_entropy = (batch.logps * mask).sum() / mask.sum().clamp(min=1)
        return neg_entropy, {"estimate": -neg_entropy.detach()}


def _searchpath(tmp_path):
    (tmp_path / "conf" / "loss").mkdir(parents=True)
    (tmp_path / "conf" / "loss" / "entropy.yaml").write_text(
        "# @package _global_\nloss:\n  entropy: true\nentropy:\n  _target_: test_terms.EntropyBonus\n"
        "  weight: 0.01\n  layer: 1\n")
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def test_a_fourth_term_is_one_class_and_one_yaml_file(make_cfg, tmp_path):
    from enigma_lightning.commands.train import run
    from enigma_lightning.runtime.validate import config_problems

    cfg = make_cfg(_searchpath(tmp_path), "loss=[grpo,entropy]", "entropy.weight=0.5", "experiment=smoke",
                   "allowed_targets=[test_terms]", out=tmp_path / "run")
    assert cfg.entropy.weight == 0.5 and cfg.grpo.beta == 0.0
    assert config_problems(cfg) == []
    SEEN.clear()
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["global_step"] == 4
    assert len(SEEN) == 4
    for seen in SEEN:  # what it declared, and only that (grpo.beta=0: GRPO asked for no reference)
        assert seen["ref_logps"] is not None and torch.isfinite(seen["ref_logps"]).all()
        assert set(seen["hidden"]) == {1} and set(seen["ref_hidden"]) == {1}
        assert seen["hidden"][1].shape == seen["ref_hidden"][1].shape
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/entropy/loss", "train/entropy/estimate", "perf/entropy_time"} <= set(header)


def test_every_term_overrides_under_its_own_name(make_cfg):
    cfg = make_cfg("loss=full", "grpo.epsilon=0.1", "sami.weight=0.2", "ot.epsilon=0.05", "step.num_generations=6")
    terms = instantiate(cfg.module.terms)
    assert list(terms) == ["grpo", "sami", "ot"]
    assert terms["grpo"].epsilon == 0.1 and terms["sami"].weight == 0.2 and terms["ot"].epsilon == 0.05
    assert instantiate(cfg.module.group).num_generations == 6 and cfg.data.num_generations == 6


def test_needs_union_is_what_the_step_computes(make_cfg):
    from enigma_lightning.commands.train import build_module

    module = build_module(make_cfg("experiment=smoke", "loss=full", "ot.layers=[-1,1]", "grpo.beta=0"))
    assert module.needs.reference_logps is False  # only grpo.beta != 0 asks for reference log-probs
    assert module.needs.reference_hidden_layers == (-1, 1) and module.needs.hidden_layers == (-1, 1)
    assert module.needs.num_variants == 2 and module.needs.scored_rows
    assert module.reference is not None
    grpo_only = build_module(make_cfg("experiment=smoke", "loss=grpo"))
    assert grpo_only.reference is None and grpo_only.needs == Needs()
