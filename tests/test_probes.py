"""Geometry probes: known answers on synthetic inputs, the compare pass on real (tiny) models."""

import math

import pytest
import torch

from enigma_lightning.probes import geometry as geo


def _cloud(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_identical_inputs_give_zero_divergence_unit_cka_zero_fisher_rao():
    x = _cloud(300, 16)
    assert abs(geo.sinkhorn(x, x.clone())) < 1e-5
    assert geo.linear_cka(x, x.clone()) == pytest.approx(1.0, abs=1e-12)
    logits = _cloud(50, 100)
    assert geo.fisher_rao(logits, logits.clone()).abs().max() < 1e-6


def test_cka_invariant_to_rotation_and_scale_low_for_unrelated():
    x = _cloud(500, 12)
    q, _ = torch.linalg.qr(_cloud(12, 12, seed=1))
    assert geo.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)
    assert geo.linear_cka(x, _cloud(500, 12, seed=2)) < 0.1


def test_sinkhorn_grows_with_a_shift():
    x = _cloud(200, 8)
    y = x + torch.tensor([0.5] + [0.0] * 7)
    near, far = geo.sinkhorn(x, x + 0.01, normalize=False), geo.sinkhorn(x, y, normalize=False)
    assert 0 <= near < far
    assert far == pytest.approx(0.5 ** 2 / 2, rel=0.3)  # a translation by t costs |t|^2 / 2


def test_fisher_rao_known_values():
    disjoint = geo.fisher_rao(torch.tensor([[0.0, -1e9]]), torch.tensor([[-1e9, 0.0]]))
    assert float(disjoint) == pytest.approx(math.pi, abs=1e-6)
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    expected = 2 * math.acos(math.sqrt(0.45) + math.sqrt(0.05))
    assert float(geo.fisher_rao(p.log(), q.log())) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("dim", [2, 5])
def test_twonn_recovers_the_dimension_of_a_low_dimensional_cloud(dim):
    z = torch.rand(2000, dim, generator=torch.Generator().manual_seed(dim))
    embed = torch.linalg.qr(_cloud(20, dim, seed=3))[0]  # isometric embedding into 20 dimensions
    est = geo.twonn_dimension(z @ embed.T)
    assert abs(est - dim) < 0.2 * dim, est


def test_effective_rank_of_rank_r_matrices():
    u = torch.linalg.qr(_cloud(100, 5))[0]
    v = torch.linalg.qr(_cloud(40, 5, seed=1))[0]
    equal = u @ v.T  # rank 5, equal singular values
    assert geo.effective_rank(equal, center=False) == pytest.approx(5.0, abs=1e-6)
    random_r = _cloud(200, 7) @ _cloud(7, 64, seed=2)
    assert 0.7 * 7 < geo.effective_rank(random_r) <= 7 + 1e-6
    assert geo.effective_rank(torch.ones(10, 4)) == 0.0  # no spread after centring


def test_cosine_and_shift():
    a = torch.tensor([1.0, 0.0])
    assert geo.cosine(a, 2 * a) == pytest.approx(1.0)
    assert geo.cosine(a, torch.tensor([0.0, 3.0])) == pytest.approx(0.0)
    assert math.isnan(geo.cosine(a, torch.zeros(2)))
    x = torch.ones(4, 2)
    assert geo.relative_shift(x * 1.5, x) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_models(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from enigma_lightning.data.prompts import PromptTemplate

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    moved = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        for p in moved.model.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok, ref, moved, PromptTemplate(system="{principles}")


def test_compare_a_model_with_itself_and_with_a_moved_copy(tiny_models):
    from enigma_lightning.commands.probe import compare, probe_texts
    from enigma_lightning.data.principles import PrincipleSet

    tok, ref, moved, prompt = tiny_models
    texts = probe_texts(tok, prompt, PrincipleSet("p", "Be careful.", antithesis="Be careless."), num_questions=4)
    assert len(texts["principle"]) == len(texts["antithesis"]) == len(texts["completions"]) == 4
    same = compare(ref, ref, tok, texts)
    n = ref.config.num_hidden_layers + 1
    assert same["layers"] == list(range(n)) and same["num_tokens"] > 0
    pl = same["per_layer"]
    assert max(abs(v) for v in pl["sinkhorn"]) < 1e-5
    assert min(pl["cka"]) == pytest.approx(1.0, abs=1e-9)
    assert max(pl["fisher_rao"]) < 1e-6 and max(pl["mean_shift"]) == 0
    assert pl["twonn_policy"] == pl["twonn_reference"] and pl["erank_policy"] == pl["erank_reference"]

    diff = compare(moved, ref, tok, texts, fisher_rao_layers="last")["per_layer"]
    # only the last block moved: every layer before it is untouched, the last one is not
    assert max(abs(v) for v in diff["sinkhorn"][:-1]) < 1e-5 and diff["sinkhorn"][-1] > 1e-4
    assert diff["cka"][-1] < 1 - 1e-6 and diff["fisher_rao"][-1] > 0
    assert all(math.isnan(v) for v in diff["fisher_rao"][:-1])
    assert -1 <= diff["principle_alignment"][-1] <= 1


def test_write_outputs(tmp_path, tiny_models):
    from enigma_lightning.commands.probe import compare, probe_texts, write_outputs
    from enigma_lightning.data.principles import PrincipleSet

    tok, ref, moved, prompt = tiny_models
    texts = probe_texts(tok, prompt, PrincipleSet("p", "Be careful."), num_questions=2)
    assert "antithesis" not in texts
    result = compare(moved, ref, tok, texts, layers=[0, -1])
    assert result["layers"] == [0, ref.config.num_hidden_layers]
    assert all(math.isnan(v) for v in result["per_layer"]["principle_alignment"])  # no antithesis: no direction
    write_outputs(result, tmp_path)
    import json

    assert json.loads((tmp_path / "probe.json").read_text())["per_layer"]["principle_alignment"] == [None, None]
    assert (tmp_path / "probe_layers.png").stat().st_size > 10_000
    assert (tmp_path / "probe.md").read_text().count("\n| ") == 3  # header + 2 layers
