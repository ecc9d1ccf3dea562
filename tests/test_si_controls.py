"""The Sufficiency Index's controls and evidence (``python -m enigma_lightning.si``), and principle creation
(``python -m enigma_lightning.principles create``)."""

import json
import math

import pytest
import torch
from helpers import run_cli

from enigma_lightning.commands.principles import Draft, check_draft, parse_draft
from enigma_lightning.commands.si import shuffled_si, summarize
from enigma_lightning.metrics.infonce import per_matrix_infonce


def _scores(n=48, k=2, signal=0.0, seed=0):
    """Score matrices at the scale real ones have (mean token log-probs around -1, prompt effects of ~0.01 nats):
    each CoT's own likelihood, a prompt effect, noise, and ``signal`` on the diagonal."""
    g = torch.Generator().manual_seed(seed)
    cot = -1 + 0.1 * torch.randn(n, 1, k, generator=g)
    prompt = 0.01 * torch.randn(n, k, 1, generator=g)
    noise = 0.01 * torch.randn(n, k, k, generator=g)
    return cot + prompt + noise + signal * torch.eye(k)


def test_null_control_is_about_zero_and_covers_it_when_cots_carry_nothing():
    r = summarize(_scores(), bootstrap=200, permutations=2000)
    assert abs(r["null_si"]) < 2e-3 and r["null_low"] < 0 < r["null_high"], r
    assert r["p_value"] > 0.05 and not r["separated"]


def test_permutation_p_value_separates_a_set_whose_cots_identify_their_principle():
    r = summarize(_scores(signal=0.02), bootstrap=200, permutations=2000)
    assert r["si"] > r["null_high"] and r["p_value"] < 0.01 and r["separated"], r
    assert r["p_value"] >= 1 / 2001  # the measured labelling counts among the shuffles: p is never 0


def test_permutation_p_value_is_calibrated_under_the_null():
    """Over many sets with no signal, p < 0.1 about 10% of the time (a valid test is not over-confident)."""
    ps = [summarize(_scores(n=16, seed=s), bootstrap=10, permutations=200, seed=s)["p_value"] for s in range(200)]
    assert 0.04 < sum(p < 0.1 for p in ps) / len(ps) < 0.18


def test_shuffles_of_identical_cots_tie_with_the_measured_si():
    scores = torch.full((8, 3, 3), -1.0) + torch.randn(8, 3, 1) * 0.01  # every CoT the same: columns identical
    r = summarize(scores, bootstrap=10, permutations=100)
    assert r["p_value"] == 1.0 and not r["separated"]
    assert torch.allclose(shuffled_si(scores, 50), torch.full((50,), r["si"], dtype=torch.float64), atol=1e-7)


def test_si_command_reports_the_controls_and_writes_its_evidence(tmp_path):
    """The real pipeline on the tiny model: the null control and the self control (the set against itself: at most 0
    with sampled CoTs, exactly 0 under greedy decoding) beside the set, and samples.jsonl from which the set's SI can
    be computed again."""
    out = tmp_path / "si"
    r = run_cli("enigma_lightning.si", "model=tiny", "sets=[high_si,low_si]", "num_questions=4",
                "rollout.max_new_tokens=8", "bootstrap=50", "permutations=200", "self_control=true",
                "decoding=sample", "wandb_mode=offline", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "si_high_si.json").read_text())
    for key in ("null_si", "null_low", "null_high", "p_value", "separated", "cots_differ", "self_si"):
        assert key in res, key
    # identical prompts: no CoT is told apart better than chance; sampled CoTs of unequal likelihood pull the bound
    # slightly below 0 (the row-wise cross-entropy is at least log K)
    assert -0.01 < res["self_si"] <= 1e-9 and res["self_ci_high"] <= 1e-9
    assert res["null_low"] <= res["null_si"] <= res["null_high"]
    table = (out / "si_table.md").read_text()
    assert "null (shuffled)" in table and "vs null" in table and "self control" in table
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 2  # sets x questions x variants
    mine = [x for x in rows if x["set"] == "high_si"]
    assert {x["variant"] for x in mine} == set(res["variants"]) and all(x["cot"].startswith("<reasoning>") for x in mine)
    # the evidence reproduces the number: each question's matrix from the CoTs' scores under every prompt
    mats = torch.zeros(4, 2, 2, dtype=torch.float64)
    for x in mine:
        mats[x["question_index"], :, x["variant_index"]] = torch.tensor(x["scores_under_prompts"], dtype=torch.float64)
        assert x["prompt_row"][x["variant_index"]] == x["scores_under_prompts"][x["variant_index"]]
    si = (math.log(2) - per_matrix_infonce(mats).mean()) / math.log(2)
    assert abs(float(si) - res["si"]) < 1e-5
    assert list((out / "wandb").glob("offline-run-*"))
    greedy = run_cli("enigma_lightning.si", "model=tiny", "principles=high_si", "num_questions=2",
                     "rollout.max_new_tokens=6", "bootstrap=20", "permutations=50", "self_control=true",
                     "wandb_mode=disabled", f"hydra.run.dir={tmp_path / 'greedy'}")
    assert greedy.returncode == 0, greedy.stderr[-3000:]
    res = json.loads((tmp_path / "greedy" / "si.json").read_text())
    assert abs(res["self_si"]) < 1e-6 and res["self_ci_low"] <= 1e-6 <= res["self_ci_high"] + 2e-6


@pytest.mark.parametrize("raw, truncated, expected", [
    ("Principle: Use digits.\nAntithesis: Use words.", False, ("Use digits.", "Use words.", "")),
    ("Principle: Use digits.\nAntithesis: Use words.\n\nPrinciple: again", True, ("Use digits.", "Use words.", "")),
    ("Principle: Use digits.\nAntithesis: Use words.\nsome chatter", True, ("Use digits.", "Use words.", "")),
    ("Principle: Use digits. Antithesis: Use words and", True,
     ("Use digits.", "Use words and", "unfinished: the writer stopped at writer_max_new_tokens mid-antithesis")),
    ("Principle: Use digits and nothing else", False,
     ("Use digits and nothing else", "", "no antithesis (the draft has no 'Antithesis:' part)")),
])
def test_writer_drafts_are_parsed(raw, truncated, expected):
    assert parse_draft(raw, truncated) == expected


def test_unusable_drafts_are_rejected_with_their_reason():
    def check(text, antithesis, earlier=(), max_tokens=50, fits=lambda s: True):
        return check_draft(Draft(9, "", text, antithesis), list(earlier), "Be kind.", lambda s: len(s.split()),
                           max_tokens, fits)

    assert check("Write digits.", "Write words.") == ""
    assert check("", "Write words.") == "empty principle"
    assert check("Write digits.", "") == "empty antithesis"
    assert check("Write digits.", "write DIGITS") == "the antithesis is the principle itself"
    assert check("Be kind", "Be cruel.") == "the source set's text, unchanged"
    assert check("Write digits.", "Write words.", [Draft(2, "", "Write digits", "Write words!")]) == \
        "the same as draft 2"
    assert check("Write digits " * 30, "Write words.", max_tokens=20).startswith("too long: the principle has 60")
    assert check("Write digits.", "Write words.", fits=lambda s: "words" not in s).startswith(
        "too long for the context")


def test_create_measures_drafts_writes_the_best_as_a_set_and_reports_the_rest(tmp_path):
    """Principle creation end to end on the tiny model (its own drafts are noise, so drafts come from a file too):
    rejected drafts are reported with their reason, the kept one is written with its SI and provenance, and the
    written file is a set principles=<name> selects."""
    drafts = tmp_path / "drafts.jsonl"
    drafts.write_text("\n".join(json.dumps(d) for d in [
        {"text": "Write every number as digits.", "antithesis": "Spell every number out in words."},
        {"text": "Answer in one sentence.", "antithesis": ""},
        {"text": "Answer in one sentence.", "antithesis": "answer in ONE sentence"},
        {"text": "Write every number as digits.", "antithesis": "Spell every number out in words."},
    ]) + "\n")
    conf, out = tmp_path / "conf", tmp_path / "run"
    r = run_cli("enigma_lightning.principles", "create", "model=tiny", "from=high_si", "candidates=2",
                f"drafts={drafts}", "keep=1", "require_separation=false", "name=made", "num_questions=3",
                "confirm_questions=2", "rollout.max_new_tokens=6", "writer_max_new_tokens=12", "bootstrap=20",
                "permutations=50", "wandb_mode=offline", f"hydra.run.dir={out}", env={"ENIGMA_CONF": str(conf)})
    assert r.returncode == 0, r.stderr[-3000:]
    cands = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 6 and [c["origin"].startswith("writer") for c in cands] == [True, True] + [False] * 4
    for c in cands[:2]:  # a draft without an antithesis was asked for one in a second pass
        assert "\nAntithesis:" in c["raw"] or c["origin"] == "writer", c
    by_text = {(c["text"], c["antithesis"], c["index"]): c for c in cands}
    assert by_text[("Answer in one sentence.", "", 3)]["reason"] == "empty antithesis"
    assert by_text[("Answer in one sentence.", "answer in ONE sentence", 4)]["reason"] == \
        "the antithesis is the principle itself"
    assert by_text[("Write every number as digits.", "Spell every number out in words.", 5)]["reason"] == \
        "the same as draft 2"
    assert all(c["reason"] for c in cands if c["status"] == "rejected")
    written = [c for c in cands if c["status"] == "written"]
    assert len(written) == 1 and written[0]["si"]["confirm_si"] is not None
    path = conf / "principles" / "made_1.yaml"
    assert path.exists() and (out / "sets" / "made_1.yaml").read_text() == path.read_text()
    assert "| written |" in (out / "candidates.md").read_text()
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 3 * (1 + sum(c["si"] is not None for c in cands)) + 2 * 2  # + the confirmation

    import yaml

    data = yaml.safe_load(path.read_text())
    assert data["text"] == written[0]["text"] and data["si"]["num_questions"] == 2
    assert data["provenance"]["from"] == "high_si" and data["provenance"]["draft"] == written[0]["index"]
    listed = run_cli("enigma_lightning.principles", "list", env={"ENIGMA_CONF": str(conf)})
    assert listed.returncode == 0 and "made_1" in listed.stdout and "high_si" in listed.stdout
    # the written set is one principles=<name> selects, in training as in si
    import os

    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    old = os.environ.get("ENIGMA_CONF")
    os.environ["ENIGMA_CONF"] = str(conf)
    try:
        with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
            cfg = compose("train", overrides=["principles=made_1", f"paths.output_dir={tmp_path / 'x'}"])
        ps = instantiate(cfg.principles)
    finally:
        os.environ.pop("ENIGMA_CONF") if old is None else os.environ.__setitem__("ENIGMA_CONF", old)
    assert (ps.name, ps.text, ps.antithesis) == ("made_1", written[0]["text"], written[0]["antithesis"])
    again = run_cli("enigma_lightning.principles", "create", "model=tiny", "from=high_si", "name=made", "keep=1",
                    f"hydra.run.dir={tmp_path / 'again'}", env={"ENIGMA_CONF": str(conf)})
    assert again.returncode == 2 and "made_1.yaml already exist" in again.stderr and "overwrite=true" in again.stderr
    assert "Loading" not in again.stderr  # refused before any model loads
