"""Rounding importance through the library (llama-quantize's importance matrix): `quantize_model(importance=)`
rounds each gguf:* layer as `quantize(W, config, importance=...)` does and every other layer as without one;
`decompose` / `loftq` use it in their quantizations (gguf:* only); `error_table`'s costs are the errors of the
weighted rounding (its cache key grows an "importance" digest only when one is given); `LQConfig(importance=...)`
is validated, recorded as a path, and reaches the decompositions, the plainly quantized layers, the table of the
ILP path and the streamed checkpoint path, which builds the same model bit for bit."""
import copy
import json

import pytest
import torch

from qbara import AdapterConfig, LQConfig, QbaraError, QuantConfig, lq_prepare, prepare, quantize_model
from qbara.adapters.attach import adapter_layers, attach_adapters
from qbara.lq import decompose, error_table, loftq, matrix_costs, save_fisher, save_importance
from qbara.lq.decompose import quantize_step, rounding_importance_of
from qbara.models import tiny_llama
from qbara.models.loader import load_model
from qbara.models.lq import quantize_with_factors
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant import quantize
from qbara.targets import linear_layer_names
from tests.helpers import nonuniform_fisher

Q4_0 = QuantConfig("gguf:q4_0")
Q5_1 = QuantConfig("gguf:q5_1")
Q4_K = QuantConfig("gguf:q4_k")
NF4 = QuantConfig("nf4", block_size=32)
INT4 = QuantConfig("int4", 32)
RANK, ALPHA = 4, 8.0
ADAPTER = AdapterConfig(rank=RANK, alpha=ALPHA)
IDS = torch.tensor([[1, 7, 42, 3, 9, 100, 5]])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def _importance(model_or_shapes, seed=0, per_weight=()):
    """name -> a strongly non-uniform importance: per input column (log-normal over ~4 decades, a few exact
    zeros), or per weight for the names in `per_weight`."""
    if isinstance(model_or_shapes, torch.nn.Module):
        shapes = {n: tuple(model_or_shapes.get_submodule(n).weight.shape)
                  for n in linear_layer_names(model_or_shapes, "all-linear")}
    else:
        shapes = model_or_shapes
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, (d_out, d_in) in shapes.items():
        shape = (d_out, d_in) if n in per_weight else (d_in,)
        imp = torch.exp(2.0 * torch.randn(shape, generator=g))
        imp.view(-1)[::37] = 0.0
        out[n] = imp
    return out




def _codes(layer):
    return layer.qweight.tensors["codes"]


def _weights(model):
    return {n: model.get_submodule(n).weight.detach().clone() for n in linear_layer_names(model, "all-linear")}


def _assert_same_model(expected, got):
    a, b = expected.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(b[key], value), key
    assert got.qbara.base_fingerprint == expected.qbara.base_fingerprint
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, expected(IDS).logits)


def _random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


# --------------------------------------------------------------------------------------------------
# quantize_model / QuantizedLinear.from_linear


@pytest.mark.parametrize("config, dims", [(Q4_0, {}), (Q5_1, {}), (Q4_K, {"hidden": 256, "intermediate": 256})])
def test_quantize_model_rounds_each_gguf_layer_with_its_importance(config, dims):
    base, _ = tiny_llama(seed=1, **dims)
    weights = _weights(base)
    imp = _importance(base, per_weight=["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"])
    model = quantize_model(copy.deepcopy(base), config, importance=imp)
    plain = quantize_model(copy.deepcopy(base), config)
    assert set(weights) == set(imp)
    for n, w in weights.items():
        layer = model.get_submodule(n)
        assert isinstance(layer, QuantizedLinear) and layer.quant_config == config
        assert torch.equal(_codes(layer), quantize(w, config, importance=imp[n]).tensors["codes"]), n
        assert not torch.equal(_codes(layer), _codes(plain.get_submodule(n))), n  # the importance counts
    assert isinstance(model.lm_head, torch.nn.Linear) and torch.equal(model.lm_head.weight, base.lm_head.weight)


def test_weighted_rounding_lowers_the_weighted_error_over_the_model():
    """What the importance is for: summed over the layers, sum_j imp_j (W - Q)_ij^2 is lower with it."""
    base, _ = tiny_llama(seed=2)
    weights = _weights(base)
    imp = _importance(base, seed=2)
    weighted = quantize_model(copy.deepcopy(base), Q4_0, importance=imp)
    plain = quantize_model(copy.deepcopy(base), Q4_0)

    def error(model):
        return sum(float((imp[n][None, :] * (w - model.get_submodule(n).dequantize()) ** 2).sum())
                   for n, w in weights.items())

    assert error(weighted) < 0.97 * error(plain)


def test_a_mixed_mapping_rounds_only_its_gguf_layers_with_the_importance():
    base, _ = tiny_llama(seed=3)
    names = linear_layer_names(base, "all-linear")
    kinds = [NF4, INT4, Q4_0, Q5_1]
    mapping = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    gguf = [n for n in names if mapping[n].kind == "gguf"]
    full = _importance(base, seed=3)
    only_gguf = {n: full[n] for n in gguf}
    plain = quantize_model(copy.deepcopy(base), mapping)
    for imp in (full, only_gguf):  # entries for the NF / INT layers are not needed, and not used
        model = quantize_model(copy.deepcopy(base), mapping, importance=imp)
        for n in names:
            got, without = model.get_submodule(n), plain.get_submodule(n)
            assert got.quant_config == mapping[n]
            if n in gguf:
                want = quantize(base.get_submodule(n).weight.detach(), mapping[n], importance=imp[n])
                assert torch.equal(_codes(got), want.tensors["codes"]), n
                assert not torch.equal(_codes(got), _codes(without)), n
            else:
                assert got.state_dict().keys() == without.state_dict().keys()
                for key, value in without.state_dict().items():
                    assert torch.equal(got.state_dict()[key], value), (n, key)


def test_an_importance_lacking_a_gguf_layer_or_with_no_gguf_layer_is_refused():
    base, _ = tiny_llama(seed=4)
    imp = _importance(base)
    lacking = dict(imp)
    del lacking["model.layers.1.mlp.down_proj"]
    model = copy.deepcopy(base)
    with pytest.raises(QbaraError, match="importance lacks.*model.layers.1.mlp.down_proj"):
        quantize_model(model, Q4_0, importance=lacking)
    with pytest.raises(QbaraError, match="gguf:\\* formats only"):
        quantize_model(model, NF4, importance=imp)
    with pytest.raises(QbaraError, match="gguf:\\* formats only"):
        quantize_model(model, {n: INT4 for n in imp}, importance=imp)
    with pytest.raises(QbaraError, match="must map layer names to tensors"):
        quantize_model(model, Q4_0, importance=torch.ones(64))
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # refused before any change
    # a mapping that lacks only NF layers is fine
    mapping = {"model.layers.0.mlp.up_proj": Q4_0, "model.layers.0.mlp.down_proj": NF4}
    quantize_model(model, mapping, importance={"model.layers.0.mlp.up_proj": imp["model.layers.0.mlp.up_proj"]})
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)


def test_from_linear_takes_the_importance():
    linear = torch.nn.Linear(64, 32, bias=True)
    with torch.no_grad():
        linear.weight.copy_(_random((32, 64), 5))
    imp = _importance({"x": (32, 64)}, seed=5)["x"]
    layer = QuantizedLinear.from_linear(linear, Q4_0, importance=imp)
    assert torch.equal(_codes(layer), quantize(linear.weight.detach(), Q4_0, importance=imp).tensors["codes"])
    assert not torch.equal(_codes(layer), _codes(QuantizedLinear.from_linear(linear, Q4_0)))
    assert torch.equal(layer.bias, linear.bias)
    with pytest.raises(QbaraError, match="gguf:\\* formats only"):
        QuantizedLinear.from_linear(linear, NF4, importance=imp)


# --------------------------------------------------------------------------------------------------
# decompose / loftq


def test_decompose_at_rank_0_is_the_weighted_quantization():
    W = _random((64, 128), 6)
    imp = _importance({"w": (64, 128)}, seed=6)["w"]
    dec = decompose(W, Q4_0, rank=0, importance=imp)
    want = quantize(W, Q4_0, importance=imp)
    assert torch.equal(dec.qtensor.tensors["codes"], want.tensors["codes"])
    assert not torch.equal(want.tensors["codes"], quantize(W, Q4_0).tensors["codes"])
    assert dec.error == pytest.approx(float(torch.linalg.vector_norm(W - want.dequantize(torch.float32))),
                                      rel=1e-6)


@pytest.mark.parametrize("per_weight", [False, True])
def test_decompose_quantizes_every_residual_with_the_importance(per_weight):
    W = _random((64, 128), 7)
    imp = _importance({"w": (64, 128)}, seed=7, per_weight=["w"] if per_weight else ())["w"]
    dec = decompose(W, Q4_0, rank=RANK, max_iters=4, importance=imp)
    # the Q held is the weighted rounding of the residual its factors leave
    R = W - dec.L1 @ dec.L2
    Q = quantize(R, Q4_0, importance=imp)
    assert torch.equal(dec.qtensor.tensors["codes"], Q.tensors["codes"])
    assert dec.error == pytest.approx(float(torch.linalg.vector_norm(R - Q.dequantize(torch.float32))), rel=1e-5)
    plain = decompose(W, Q4_0, rank=RANK, max_iters=4)
    assert not torch.equal(dec.qtensor.tensors["codes"], plain.qtensor.tensors["codes"])


@pytest.mark.parametrize("config", [NF4, INT4, QuantConfig("nf4", block_size=64, dq_style="bnb")])
def test_formats_that_round_to_nearest_ignore_the_importance(config):
    W = _random((64, 128), 8)
    imp = _importance({"w": (64, 128)}, seed=8)["w"]
    a = decompose(W, config, rank=RANK, max_iters=3, importance=imp)
    b = decompose(W, config, rank=RANK, max_iters=3)
    for key, value in b.qtensor.tensors.items():
        assert torch.equal(a.qtensor.tensors[key], value), key
    assert torch.equal(a.L1, b.L1) and torch.equal(a.L2, b.L2) and a.errors == b.errors
    c = loftq(W, config, rank=RANK, iters=2, importance=imp)
    d = loftq(W, config, rank=RANK, iters=2)
    assert torch.equal(c.qtensor.tensors["codes"], d.qtensor.tensors["codes"]) and torch.equal(c.L1, d.L1)
    assert rounding_importance_of(config, imp, (64, 128)) is None
    R = _random((64, 128), 9)
    assert torch.equal(quantize_step(config, "w", imp)(R)[0], quantize_step(config, "w")(R)[0])


def test_quantize_step_and_rounding_importance_of_a_gguf_config():
    R = _random((64, 128), 10)
    imp = _importance({"w": (64, 128)}, seed=10)["w"]
    got = quantize_step(Q4_0, "w", imp)(R)[0]
    assert torch.equal(got, quantize(R, Q4_0, importance=imp).dequantize(torch.float32))
    assert not torch.equal(got, quantize_step(Q4_0, "w")(R)[0])
    checked = rounding_importance_of(Q4_0, imp.double(), (64, 128))
    assert checked.dtype == torch.float32 and torch.equal(checked, imp)
    assert rounding_importance_of(Q4_0, None, (64, 128)) is None


@pytest.mark.parametrize("bad, match", [
    (torch.ones(64), "importance has shape \\(64,\\)"),
    (torch.ones(128, 64), "importance has shape \\(128, 64\\)"),
    (torch.ones(1, 128), "importance has shape \\(1, 128\\)"),
    (-torch.ones(128), "negative, NaN or Inf"),
    (torch.full((128,), float("nan")), "negative, NaN or Inf"),
    (torch.ones(128, dtype=torch.int64), "must be a float tensor"),
])
def test_a_bad_importance_is_refused_by_decompose_and_loftq(bad, match):
    W = _random((64, 128), 11)
    with pytest.raises(QbaraError, match=match):
        decompose(W, Q4_0, rank=RANK, max_iters=2, importance=bad, name="w")
    with pytest.raises(QbaraError, match=match):
        decompose(W, Q4_0, rank=0, importance=bad, name="w")
    with pytest.raises(QbaraError, match=match):
        loftq(W, Q4_0, rank=RANK, importance=bad, name="w")


def test_loftq_with_one_alternation_quantizes_w_with_the_importance():
    """LoftQ's first step is Q = quantize(W); its factors the best rank-r fit of W - Q."""
    W = _random((64, 128), 12)
    imp = _importance({"w": (64, 128)}, seed=12)["w"]
    dec = loftq(W, Q4_0, rank=RANK, iters=1, importance=imp)
    Q = quantize(W, Q4_0, importance=imp)
    assert torch.equal(dec.qtensor.tensors["codes"], Q.tensors["codes"])
    U, S, Vh = torch.linalg.svd(W - Q.dequantize(torch.float32).double(), full_matrices=False)
    best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
    torch.testing.assert_close((dec.L1 @ dec.L2).double(), best, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# error tables


GGUF_CONFIGS = [Q4_0, Q5_1, QuantConfig("gguf:q3_k"), Q4_K, QuantConfig("gguf:q8_0")]
SHAPES = {"a": (64, 256), "b": (32, 256), "c": (48, 64)}


def _table_inputs(seed=13):
    weights = {n: _random(s, seed + i) for i, (n, s) in enumerate(SHAPES.items())}
    return weights, _importance(SHAPES, seed=seed, per_weight=["b"])


def _squared_error(W, config, importance, fisher=None):
    try:
        config.check_shape(tuple(W.shape))
    except QbaraError:
        return float("inf")
    E = (W.double() - quantize(W, config, importance=importance).dequantize(torch.float32).double()) ** 2
    return float(E.sum() if fisher is None else (fisher.double() * E).sum())


@pytest.mark.parametrize("fisher_weighted", [False, True])
def test_table_costs_are_the_errors_of_the_weighted_rounding(tmp_path, fisher_weighted):
    weights, imp = _table_inputs()
    g = torch.Generator().manual_seed(14)
    fisher = {n: torch.rand(s, generator=g) * 10 for n, s in SHAPES.items()} if fisher_weighted else None
    table = error_table(weights, GGUF_CONFIGS, rank=0, iters=1, importance=imp, fisher=fisher, cache_dir=tmp_path,
                        progress=False)
    plain = error_table(weights, GGUF_CONFIGS, rank=0, iters=1, fisher=fisher, cache_dir=tmp_path, progress=False)
    assert table.names == list(SHAPES) and table.configs == GGUF_CONFIGS
    for i, n in enumerate(table.names):
        for j, c in enumerate(GGUF_CONFIGS):
            f = None if fisher is None else fisher[n]
            want = _squared_error(weights[n], c, imp[n], f)
            got = float(table.costs[i, j])
            if want == float("inf"):
                assert got == float("inf"), (n, c.label)  # K-quants cannot hold "c" (64 columns)
                continue
            assert got == pytest.approx(want, rel=1e-5), (n, c.label)
            assert float(plain.costs[i, j]) == pytest.approx(_squared_error(weights[n], c, None, f), rel=1e-5)
            if c.format != "gguf:q8_0":  # q8_0 has no weighted search (llama.cpp's neither)
                assert got != pytest.approx(float(plain.costs[i, j]), rel=1e-6), (n, c.label)
            else:
                assert got == float(plain.costs[i, j])
    # matrix_costs is the same row
    row = matrix_costs(weights["a"], GGUF_CONFIGS, rank=0, iters=1, importance=imp["a"],
                       fisher=None if fisher is None else fisher["a"], name="a")
    assert torch.equal(row, table.costs[0])


def test_an_importance_is_part_of_the_cache_key_only_when_given(tmp_path):
    weights, imp = _table_inputs()
    configs = GGUF_CONFIGS + [NF4]
    plain = error_table(weights, configs, rank=0, iters=1, cache_dir=tmp_path, progress=False)
    weighted = error_table(weights, configs, rank=0, iters=1, importance=imp, cache_dir=tmp_path, progress=False)
    assert "importance" not in plain.settings and isinstance(weighted.settings["importance"], str)
    assert {k: v for k, v in weighted.settings.items() if k != "importance"} == plain.settings
    assert plain.path != weighted.path and plain.path.is_file() and weighted.path.is_file()
    assert json.loads(weighted.path.with_suffix(".json").read_text())  # its settings are recorded with it
    # NF configs round to nearest: their column is the same
    nf = configs.index(NF4)
    assert torch.equal(plain.costs[:, nf], weighted.costs[:, nf])
    # the same importance hits the cache; another one is another entry
    again = error_table(weights, configs, rank=0, iters=1, importance={n: t.clone() for n, t in imp.items()},
                        cache_dir=tmp_path, progress=False)
    assert again.from_cache and again.path == weighted.path and torch.equal(again.costs, weighted.costs)
    other_imp = dict(imp, a=imp["a"] * 2 + 1)
    other = error_table(weights, configs, rank=0, iters=1, importance=other_imp, cache_dir=tmp_path, progress=False)
    assert not other.from_cache and other.path not in (plain.path, weighted.path)
    plain_again = error_table(weights, configs, rank=0, iters=1, cache_dir=tmp_path, progress=False)
    assert plain_again.from_cache and plain_again.path == plain.path
    assert sorted(p.name for p in tmp_path.glob("table-*.safetensors")) == sorted(
        p.name for p in (plain.path, weighted.path, other.path))


def test_a_table_importance_lacking_a_matrix_is_refused(tmp_path):
    weights, imp = _table_inputs()
    del imp["b"]
    with pytest.raises(QbaraError, match="importance lacks \\['b'\\]"):
        error_table(weights, GGUF_CONFIGS, rank=0, iters=1, importance=imp, cache_dir=tmp_path, progress=False)
    bad = dict(_table_inputs()[1], c=torch.ones(5))
    with pytest.raises(QbaraError, match="importance has shape \\(5,\\)"):
        error_table(weights, GGUF_CONFIGS, rank=0, iters=1, importance=bad, cache_dir=tmp_path, progress=False)


def test_an_importance_with_only_nf_configs_is_refused(tmp_path):
    """As quantize_model and LQConfig refuse it: NF rounds to nearest, so an importance there is a mistake."""
    weights, imp = _table_inputs()
    del imp["b"]
    for importance in (imp, _table_inputs()[1]):
        with pytest.raises(QbaraError, match="none of the configs is one"):
            error_table(weights, [NF4], rank=0, iters=1, importance=importance, cache_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------------------------------
# LQConfig


@pytest.mark.parametrize("kwargs, match", [
    ({"configs": Q4_0, "importance": "fisher"}, "importance='fisher'.*pass fisher= too"),
    ({"budget": 3.0, "importance": {"x": torch.ones(3)}}, "none of the configs is one.*default candidates are NF"),
    ({"budget": 3.0, "importance": "imatrix.safetensors"}, "none of the configs is one"),
    ({"configs": NF4, "importance": {"x": torch.ones(3)}}, "none of the configs is one"),
    ({"budget": 3.0, "configs": [NF4, INT4], "importance": "f.safetensors"}, "none of the configs is one"),
    ({"configs": {"model.layers.0.mlp.up_proj": NF4}, "importance": "f"}, "none of the configs is one"),
    ({"configs": Q4_0, "importance": 3}, "LQConfig.importance must be Mapping or str or Path"),
])
def test_invalid_importance_settings_are_refused(kwargs, match):
    with pytest.raises(QbaraError, match=match):
        LQConfig(**kwargs)


def test_valid_importance_settings():
    imp = {"x": torch.ones(3)}
    assert LQConfig(configs=Q4_0, importance=imp).importance is imp
    assert LQConfig(budget=5.0, configs=[NF4, Q4_0], importance="i.safetensors").importance == "i.safetensors"
    assert LQConfig(configs={"a": NF4, "b": Q4_K}, importance=imp).open_importance() is imp
    fisher = {"x": torch.ones(2, 3)}
    lq = LQConfig(configs=Q4_0, fisher=fisher, importance="fisher")
    assert lq.open_importance() is fisher
    # an in-memory importance compares by identity
    assert lq == LQConfig(configs=Q4_0, fisher=fisher, importance="fisher")
    a = LQConfig(configs=Q4_0, importance=imp)
    assert a == LQConfig(configs=Q4_0, importance=imp) and a != LQConfig(configs=Q4_0, importance={"x": torch.ones(3)})
    assert a != LQConfig(configs=Q4_0)


def test_to_dict_records_an_importance_file_and_refuses_an_in_memory_one(tmp_path):
    with pytest.raises(QbaraError, match="in-memory importance.*save_importance"):
        LQConfig(configs=Q4_0, importance={"x": torch.ones(3)}).to_dict()
    imp = {"model.layers.0.mlp.up_proj": torch.rand(64)}
    path = save_importance(imp, tmp_path / "imatrix.safetensors")
    for config in (LQConfig(configs=Q4_0, importance=path), LQConfig(configs=Q4_0, importance=str(path)),
                   LQConfig(budget=5.0, configs=[Q4_0, Q5_1, NF4], importance=path, table_iters=2),
                   LQConfig(configs=Q4_0, fisher=str(tmp_path / "fisher.safetensors"), importance="fisher")):
        data = config.to_dict()
        assert isinstance(data["importance"], str)
        back = LQConfig.from_dict(json.loads(json.dumps(data)))
        assert back.to_dict() == data
        assert str(back.importance) == str(config.importance)
    loaded = LQConfig.from_dict(LQConfig(configs=Q4_0, importance=path).to_dict()).open_importance()
    assert loaded.keys() == imp.keys() and torch.equal(loaded["model.layers.0.mlp.up_proj"],
                                                       imp["model.layers.0.mlp.up_proj"])
    assert LQConfig(configs=Q4_0).to_dict()["importance"] is None


def test_open_importance_refuses_a_file_of_another_kind(tmp_path):
    fisher = save_fisher({"x": torch.ones(2, 64)}, tmp_path / "fisher.safetensors")
    with pytest.raises(QbaraError, match="save_importance"):
        LQConfig(configs=Q4_0, importance=fisher).open_importance()


# --------------------------------------------------------------------------------------------------
# prepare with an LQConfig: in memory and streamed


def test_lq_lora_on_one_gguf_format_decomposes_each_layer_with_its_importance():
    base, _ = tiny_llama(seed=15)
    weights = _weights(base)
    imp = _importance(base, seed=15, per_weight=["model.layers.1.mlp.gate_proj"])
    model = prepare(copy.deepcopy(base), LQConfig(configs=Q4_0, max_iters=3, importance=imp), ADAPTER)
    plain = prepare(copy.deepcopy(base), LQConfig(configs=Q4_0, max_iters=3), ADAPTER)
    layers = adapter_layers(model)
    assert list(layers) == list(weights)
    changed = 0
    for i, (n, w) in enumerate(weights.items()):  # prepare seeds matrix i with seed * 1_000_003 + i (seed 0)
        dec = decompose(w, Q4_0, RANK, 3, seed=i, importance=imp[n], name=n)
        assert torch.equal(layers[n].base.codes, dec.qtensor.tensors["codes"]), n
        torch.testing.assert_close(layers[n].delta_weight(), dec.L1 @ dec.L2, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(layers[n].base.codes, adapter_layers(plain)[n].base.codes)
    assert changed == len(weights)


def test_a_plainly_quantized_layer_and_loftq_take_the_importance():
    """Adapters on q/v only: the other linears are quantized plainly, with their importance; LoftQ (one
    alternation) starts from the weighted quantization of W."""
    base, _ = tiny_llama(seed=16)
    weights = _weights(base)
    imp = _importance(base, seed=16)
    adapter = AdapterConfig(rank=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    for lq in (LQConfig(configs=Q4_0, max_iters=2, importance=imp),
               LQConfig(configs=Q4_0, method="loftq", loftq_iters=1, importance=imp)):
        model = prepare(copy.deepcopy(base), lq, adapter)
        targets = adapter_layers(model)
        assert len(targets) == 4
        for n, w in weights.items():
            want = quantize(w, Q4_0, importance=imp[n]).tensors["codes"]
            if n in targets:
                if lq.method == "loftq":
                    assert torch.equal(targets[n].base.codes, want), n
            else:
                assert torch.equal(_codes(model.get_submodule(n)), want), n
    lacking = {n: t for n, t in imp.items() if "o_proj" not in n}
    with pytest.raises(QbaraError, match="importance lacks.*o_proj"):
        prepare(copy.deepcopy(base), LQConfig(configs=Q4_0, max_iters=2, importance=lacking), adapter)


def test_importance_fisher_is_the_fisher_passed_as_importance(tmp_path):
    base, _ = tiny_llama(seed=17)
    fisher = nonuniform_fisher(base, seed=17)
    by_name = prepare(copy.deepcopy(base), LQConfig(configs=Q4_0, max_iters=3, fisher=fisher, importance="fisher"),
                      ADAPTER)
    by_mapping = prepare(copy.deepcopy(base), LQConfig(configs=Q4_0, max_iters=3, fisher=fisher, importance=fisher),
                         ADAPTER)
    _assert_same_model(by_mapping, by_name)
    unweighted = prepare(copy.deepcopy(base), LQConfig(configs=Q4_0, max_iters=3, fisher=fisher), ADAPTER)
    assert any(not torch.equal(a.base.codes, b.base.codes)
               for a, b in zip(adapter_layers(by_name).values(), adapter_layers(unweighted).values()))
    # ... and from a Fisher file
    path = save_fisher(fisher, tmp_path / "fisher.safetensors")
    from_file = prepare(copy.deepcopy(base), LQConfig(configs=Q4_0, max_iters=3, fisher=path, importance="fisher"),
                        ADAPTER)
    _assert_same_model(by_name, from_file)


def test_the_ilp_path_weights_its_table_and_decompositions_as_the_pieces_by_hand(tmp_path):
    base, _ = tiny_llama(seed=18)
    imp = _importance(base, seed=18)
    configs = [Q4_0, Q5_1, QuantConfig("gguf:q8_0")]
    lq = LQConfig(budget=5.2, configs=configs, table_iters=2, max_iters=2, seed=1, importance=imp)
    model = prepare(copy.deepcopy(base), lq, ADAPTER)

    by_hand = copy.deepcopy(base)
    table = error_table(by_hand, configs, rank=RANK, iters=2, seed=1, importance=imp, progress=False)
    assert "importance" in table.settings
    allocation = table.allocate(5.2)
    assert len(set(allocation.indices)) > 1  # a real mix
    factors = quantize_with_factors(by_hand, allocation.configs, RANK, max_iters=2, seed=1, importance=imp,
                                    progress=False)
    attach_adapters(by_hand, AdapterConfig(rank=RANK, alpha=ALPHA, init="lq"), factors=factors)
    _assert_same_model(by_hand, model)
    assert model.qbara.lq.allocation.indices == allocation.indices
    # the same through an importance file and through lq_prepare
    path = save_importance(imp, tmp_path / "imatrix.safetensors")
    from_file = prepare(copy.deepcopy(base), LQConfig(budget=5.2, configs=configs, table_iters=2, max_iters=2,
                                                      seed=1, importance=path), ADAPTER)
    _assert_same_model(model, from_file)
    shorthand = lq_prepare(copy.deepcopy(base), 5.2, RANK, alpha=ALPHA, configs=configs, table_iters=2, max_iters=2,
                           seed=1, importance=imp, progress=False)
    _assert_same_model(model, shorthand)
    plain = prepare(copy.deepcopy(base), LQConfig(budget=5.2, configs=configs, table_iters=2, max_iters=2, seed=1),
                    ADAPTER)
    assert any(not torch.equal(a.base.codes, b.base.codes)
               for a, b in zip(adapter_layers(model).values(), adapter_layers(plain).values()))


def test_a_precomputed_table_of_another_rounding_is_refused():
    base, _ = tiny_llama(seed=18)
    imp = _importance(base, seed=18)
    configs = [Q4_0, Q5_1, QuantConfig("gguf:q8_0")]
    plain = error_table(base, configs, rank=RANK, iters=1, seed=1, progress=False)
    weighted = error_table(base, configs, rank=RANK, iters=1, seed=1, importance=imp, progress=False)
    for table, importance, have in ((plain, imp, "without"), (weighted, None, "with")):
        lq = LQConfig(budget=5.2, configs=configs, table=table, max_iters=1, importance=importance)
        with pytest.raises(QbaraError, match=f"computed {have} a rounding importance"):
            prepare(copy.deepcopy(base), lq, ADAPTER)


@pytest.mark.parametrize("kind", ["fixed", "budget", "loftq"])
def test_a_checkpoint_folder_is_streamed_to_the_same_weighted_model(tmp_path, kind):
    model, tokenizer = tiny_llama(seed=19)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    imp = _importance(model, seed=19, per_weight=["model.layers.0.mlp.down_proj"])
    path = save_importance(imp, tmp_path / "imatrix.safetensors")
    q_v = AdapterConfig(rank=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    lq, adapter = {
        "fixed": (LQConfig(configs=Q4_0, max_iters=2, importance=imp), q_v),  # plainly quantized layers too
        "budget": (LQConfig(budget=5.2, configs=[Q4_0, Q5_1, QuantConfig("gguf:q8_0")], table_iters=2,
                            max_iters=2, importance=path), ADAPTER),
        "loftq": (LQConfig(configs=Q5_1, method="loftq", loftq_iters=1, importance=path), q_v),
    }[kind]
    eager = prepare(load_model(str(folder))[0], lq, adapter)
    streamed = prepare(folder, lq, adapter)
    _assert_same_model(eager, streamed)
    assert streamed.qbara.lq.to_dict() == eager.qbara.lq.to_dict()
    # the importance reached the streamed layers: not the model without it
    without = LQConfig(**{**{f: getattr(lq, f) for f in ("budget", "configs", "method", "max_iters", "loftq_iters",
                                                          "table_iters")}, "importance": None})
    plain = prepare(folder, without, adapter)
    names = linear_layer_names(model, "all-linear")
    same = [n for n in names
            if torch.equal(streamed.state_dict()[_codes_key(streamed, n)], plain.state_dict()[_codes_key(plain, n)])]
    assert not same
    # a plainly quantized (streamed) layer is the weighted quantization of its dense weight
    if adapter is q_v:
        n = "model.layers.1.mlp.down_proj"
        want = quantize(model.get_submodule(n).weight.detach(), lq.configs, importance=imp[n]).tensors["codes"]
        assert torch.equal(_codes(streamed.get_submodule(n)), want)


def _codes_key(model, name):
    keys = [k for k in model.state_dict() if k.startswith(name + ".") and k.endswith("codes")]
    assert len(keys) == 1, keys
    return keys[0]
