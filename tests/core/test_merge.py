"""Merging: streamed recipes equal mergekit's outputs on tiny HF models; each tensor method equals an independent
naive implementation of its formula; WARP's SLERP keeps task-vector norms where LERP shrinks them."""

from __future__ import annotations

import math

import pytest
import torch

from gemmakit.errors import ConfigError
from gemmakit.loader import build_model
from gemmakit.merge import (
    EMAWeights,
    dare,
    evaluate,
    linear,
    liti,
    parse_recipe,
    random_prune,
    run_recipe,
    slerp,
    slerp_task_vectors,
    task_arithmetic,
    ties,
)
from gemmakit.weights import hf
from support.tiny_models import save_hf_model
from support.train_helpers import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for seed in range(3):
        save_hf_model("gemma3", root / f"m{seed}", seed=seed)
    return root


def recipe(method, root, **extra):
    doc = {"merge_method": method, "dtype": "float32",
           "models": [{"model": str(root / "m1"), "parameters": {"weight": 0.7, "density": 0.5}},
                      {"model": str(root / "m2"), "parameters": {"weight": [0.2, 0.9], "density": 0.3}}]}
    if method != "linear":
        doc["base_model"] = str(root / "m0")
    doc.update(extra)
    return doc


RECIPES = {
    "linear": lambda r: recipe("linear", r, parameters={"normalize": True}),
    "task_arithmetic": lambda r: recipe("task_arithmetic", r, parameters={"lambda": 0.8}),
    "ties": lambda r: recipe("ties", r, parameters={"normalize": True}),
    "slerp": lambda r: {"merge_method": "slerp", "base_model": str(r / "m0"), "dtype": "float32",
                        "models": [{"model": str(r / "m0")}, {"model": str(r / "m1")}],
                        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
}


@pytest.mark.parametrize("method", list(RECIPES))
def test_recipe_equals_mergekit(models, method, tmp_path):
    mergekit_config = pytest.importorskip("mergekit.config")
    mergekit_merge = pytest.importorskip("mergekit.merge")
    doc = RECIPES[method](models)
    mergekit_merge.run_merge(mergekit_config.MergeConfiguration.model_validate(doc), str(tmp_path / "mk"),
                             mergekit_merge.MergeOptions(quiet=True))
    run_recipe(parse_recipe(doc), tmp_path / "gk", progress=False)
    expected, got = hf.read_state_dict(tmp_path / "mk"), hf.read_state_dict(tmp_path / "gk")
    assert set(got) == set(expected)
    inputs = hf.read_state_dict(models / "m1")
    assert any(not torch.equal(got[k], inputs[k]) for k in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_merged_directory_loads_in_gemmakit_and_transformers(models, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = run_recipe(parse_recipe(RECIPES["ties"](models)), tmp_path / "out", shard_size=40_000, progress=False)
    assert (out / "model.safetensors.index.json").exists()  # small shards: several files plus the index
    ours = build_model(hf.read_config(out), hf.read_state_dict(out), torch.float32, out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)


# --- formulas, against naive re-implementations -------------------------------------------------------------------
def naive_ties(base, tensors, weights, densities):
    """Element by element: trim by magnitude, elect by weighted sum, average the agreeing weighted deltas."""
    deltas = []
    for t, d in zip(tensors, densities, strict=True):
        delta = (t - base).flatten()
        k = max(1, int(d * delta.numel()))
        keep = set(sorted(range(delta.numel()), key=lambda i: -abs(delta[i].item()))[:k])
        deltas.append([delta[i].item() if i in keep else 0.0 for i in range(delta.numel())])
    out = []
    for i, b in enumerate(base.flatten().tolist()):
        pairs = list(zip(weights, deltas, strict=True))
        total = sum(w * dl[i] for w, dl in pairs)
        sign = 1.0 if total >= 0 else -1.0
        agree = [(w, dl[i]) for w, dl in pairs if dl[i] != 0 and math.copysign(1, w * dl[i]) == sign]
        num = sum(w * x for w, x in agree)
        den = sum(w for w, _ in agree)
        out.append(b + (num / den if den else num))
    return torch.tensor(out).view(base.shape)


def test_ties_matches_naive_formula():
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(4, 6, generator=g) for _ in range(3))
    got = ties(base, [a, b], [0.7, 0.4], [0.5, 0.3])
    torch.testing.assert_close(got, naive_ties(base, [a, b], [0.7, 0.4], [0.5, 0.3]), atol=1e-6, rtol=1e-6)


def test_linear_and_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    base, a, b = (torch.randn(5, 3, generator=g) for _ in range(3))
    torch.testing.assert_close(linear([a, b], [1.0, 3.0]), (a + 3 * b) / 4)
    torch.testing.assert_close(linear([a, b], [1.0, 3.0], normalize=False), a + 3 * b)
    torch.testing.assert_close(task_arithmetic(base, [a, b], [0.5, 0.25], lam=2.0),
                               base + 2.0 * (0.5 * (a - base) + 0.25 * (b - base)))


def test_slerp_formula_and_parallel_fallback():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    got = slerp(a, b, 0.5)
    w = math.sin(math.pi / 4) / math.sin(math.pi / 2)  # 90 degrees apart: each coefficient sin(45)/sin(90)
    torch.testing.assert_close(got, torch.tensor([w, 2 * w, 0.0]))
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    near = a + 1e-4 * torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(slerp(a, 3 * near, 0.25), 0.75 * a + 0.25 * 3 * near)  # LERP, not NaN


def test_dare_rescale_rules():
    delta = torch.randn(2000, generator=torch.Generator().manual_seed(2))
    l1 = random_prune(delta, 0.3, "l1", torch.Generator().manual_seed(3))
    inv = random_prune(delta, 0.3, "inverse_density", torch.Generator().manual_seed(3))
    kept = l1 != 0
    assert torch.equal(kept, inv != 0) and 0.25 < kept.float().mean() < 0.35
    torch.testing.assert_close(l1.abs().sum(), delta.abs().sum())  # mergekit: L1 norm preserved exactly
    torch.testing.assert_close(inv[kept], delta[kept] / 0.3)  # DARE paper / PEFT: 1 / (1 - p)
    base = torch.zeros(2000)
    merged = dare(base, [delta], [1.0], [0.3], "inverse_density", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(merged, inv)


def test_warp_slerp_keeps_task_vector_norm_and_liti():
    g = torch.Generator().manual_seed(4)
    init = torch.randn(4000, generator=g)
    d1, d2 = torch.randn(4000, generator=g), torch.randn(4000, generator=g)  # ~orthogonal task vectors
    d2 = d2 * d1.norm() / d2.norm()
    merged = slerp_task_vectors(init, [init + d1, init + d2], lam=0.5)
    cos = torch.dot(d1, d2) / (d1.norm() * d2.norm())
    omega = torch.arccos(cos)
    expected = init + torch.sin(0.5 * omega) / torch.sin(omega) * (d1 + d2)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert abs((merged - init).norm() / d1.norm() - 1) < 1e-4  # Lemma 1: the norm is kept
    assert (0.5 * (d1 + d2)).norm() / d1.norm() < 0.75  # LERP shrinks it (Lemma 2)
    three = slerp_task_vectors(init, [init + d1, init + d2, init - d1])
    step = slerp(slerp(d1, d2, 0.5), -d1, 1 / 3)
    torch.testing.assert_close(three, init + step, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(liti(init, merged, 0.3), 0.7 * init + 0.3 * merged)


def test_ema_weights():
    module = torch.nn.Linear(2, 2, bias=False)
    ema = EMAWeights(module, mu=0.1)
    start = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)
    torch.testing.assert_close(ema.state_dict()["weight"], start + 0.1)


def test_parameter_settings_follow_mergekit():
    assert evaluate([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 0.25) == 0.25
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 1.0) == 1
    assert evaluate(setting, "model.norm.weight", 0.0) == 0.5


def test_recipe_errors_name_the_problem(models):
    with pytest.raises(ConfigError, match="merge_method"):
        parse_recipe({"merge_method": "frankenmerge", "models": []})
    with pytest.raises(ConfigError, match="needs base_model"):
        parse_recipe({"merge_method": "ties", "models": [{"model": str(models / "m1")}]})
    with pytest.raises(ConfigError, match="exactly two"):
        parse_recipe(recipe("slerp", models))


def test_cli_merge_recipe_file(models, tmp_path):
    import yaml

    from gemmakit.cli import main

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(RECIPES["task_arithmetic"](models)))
    assert main(["merge", str(recipe_path), str(tmp_path / "out"), "--no-progress"]) == 0
    merged = hf.read_state_dict(tmp_path / "out")
    base, a, b = (hf.read_state_dict(models / f"m{i}") for i in range(3))
    name = "model.layers.6.mlp.down_proj.weight"  # last layer: the gradient weight [0.2, 0.9] is at 0.9
    expected = base[name] + 0.8 * (0.7 * (a[name] - base[name]) + 0.9 * (b[name] - base[name]))
    torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-5)


def test_warp_and_dare_recipes(models, tmp_path):
    """`warp`: SLERP of the task vectors relative to base_model, then LITI with eta; `dare_ties` is reproducible
    under its random_seed and differs under another."""
    warp = {"merge_method": "warp", "base_model": str(models / "m0"), "parameters": {"eta": 0.3},
            "models": [{"model": str(models / "m1")}, {"model": str(models / "m2")}]}
    out = run_recipe(parse_recipe(warp), tmp_path / "warp", progress=False)
    merged = hf.read_state_dict(out)
    base, a, b = (hf.read_state_dict(models / f"m{i}") for i in range(3))
    name = "model.layers.2.self_attn.o_proj.weight"
    torch.testing.assert_close(merged[name], liti(base[name], slerp_task_vectors(base[name], [a[name], b[name]]), 0.3))
    dare_doc = {**recipe("dare_ties", models), "random_seed": 7}
    one = hf.read_state_dict(run_recipe(parse_recipe(dare_doc), tmp_path / "d1", progress=False))
    two = hf.read_state_dict(run_recipe(parse_recipe(dare_doc), tmp_path / "d2", progress=False))
    other = hf.read_state_dict(run_recipe(parse_recipe({**dare_doc, "random_seed": 8}), tmp_path / "d3",
                                          progress=False))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one[name], other[name])
