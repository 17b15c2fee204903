"""`prepare(model, LQConfig(...), AdapterConfig(...))`: the one LQ-LoRA / LoftQ entry. Its settings are validated
with errors that name the fix, and it builds the same model (bit for bit) as the pieces put together by hand
(error table -> ILP -> decompositions -> adapters from the factors), as `lq_prepare` and as the
`AdapterConfig(init="loftq")` shorthand; a Fisher matrix reaches the allocation and the factors."""
import copy
import dataclasses
import importlib
import json

import pytest
import torch

from qbara import AdapterConfig, LQConfig, QbaraError, QuantConfig, lq_prepare, prepare
from qbara.adapters.attach import adapter_layers, attach_adapters
from qbara.lq.configs import qlora_config
from qbara.lq.decompose import LQ_PATIENCE
from qbara.lq.factors import FACTOR_CONFIG
from qbara.lq.fisher import save_fisher
from qbara.lq.layers import decompose_layers
from qbara.lq.tables import error_table
from qbara.models import tiny_llama
from qbara.models.loader import load_model
from qbara.models.lq import quantize_with_factors
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.targets import linear_layer_names
from tests.helpers import nonuniform_fisher

NF4 = QuantConfig("nf4", block_size=32)
CONFIGS = [qlora_config(b) for b in (2, 3, 4)]
RANK, ALPHA = 4, 8.0
ADAPTER = AdapterConfig(rank=RANK, alpha=ALPHA)
SMALL = dict(configs=CONFIGS, table_iters=2, max_iters=3)
IDS = torch.tensor([[1, 7, 42, 3, 9, 100, 5]])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def _assert_same_model(expected, got):
    a, b = expected.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(b[key], value), key  # packed Q, factors and every other weight
    assert got.qbara.base_fingerprint == expected.qbara.base_fingerprint
    assert got.qbara.adapter_config == expected.qbara.adapter_config
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, expected(IDS).logits)




# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kwargs, match", [
    ({}, "needs budget="),
    ({"configs": CONFIGS}, "needs budget= to choose"),
    ({"budget": 3.0, "configs": NF4}, "drop budget, or give configs as a list"),
    ({"budget": 3.0, "configs": {"model.layers.0.mlp.up_proj": NF4}}, "drop budget"),
    ({"budget": -1.0}, "positive number of bits"),
    ({"budget": float("nan")}, "positive number of bits"),
    ({"budget": True}, r"LQConfig.budget must be int or float or null, got True"),
    ({"budget": 3.0, "configs": []}, "non-empty list"),
    ({"budget": 3.0, "configs": [NF4, "nf3"]}, "non-empty list of qbara.QuantConfig"),
    ({"budget": 3.0, "configs": "nf4"}, "must be a QuantConfig, a list"),
    ({"budget": 3.0, "configs": {NF4, qlora_config(3)}}, "must be a QuantConfig, a list"),  # a set has no order
    ({"configs": {}}, "empty mapping"),
    ({"configs": {"model.layers.0.mlp.up_proj": "nf4"}}, "layer name -> QuantConfig"),
    ({"budget": 3.0, "method": "lqlora"}, "unknown LQConfig.method 'lqlora'"),
    ({"budget": 3.0, "max_iters": 0}, "max_iters must be a positive integer"),
    ({"budget": 3.0, "workers": 0}, "workers must be a positive integer"),
    ({"budget": 3.0, "table_iters": 0}, "table_iters must be a positive integer"),
    ({"budget": 3.0, "patience": 0}, "patience must be a positive integer"),
    ({"budget": 3.0, "patience": 2.0}, "LQConfig.patience must be int"),
    ({"method": "loftq", "configs": NF4, "patience": 1}, "LoftQ's alternations are loftq_iters"),
    ({"budget": 3.0, "seed": 1.5}, "LQConfig.seed must be int"),
    ({"budget": 3.0, "fisher": 3}, "LQConfig.fisher must be Mapping or str or Path"),
    ({"budget": 3.0, "factor_format": "nf8"}, "LQConfig.factor_format must be QuantConfig"),
    ({"budget": 3.0, "file_budget": "yes"}, "file_budget must be bool or FileBudget"),
    ({"budget": 3.0, "loftq_iters": 3}, "loftq_iters counts LoftQ's alternations"),
    ({"configs": NF4, "loftq_iters": 3}, "loftq_iters counts LoftQ's alternations"),
    ({"configs": NF4, "table_iters": 2}, "table_iters belongs to the ILP allocation"),
    ({"budget": 3.0, "table_mode": "fast"}, "unknown LQConfig.table_mode 'fast'"),
    ({"configs": NF4, "table_mode": "shared"}, "table_mode belongs to the ILP allocation"),
    ({"method": "loftq", "configs": NF4, "table_mode": "shared"}, "drop table_mode"),
    ({"configs": NF4, "table": "table.safetensors"}, "table belongs to the ILP allocation"),
    ({"configs": NF4, "file_budget": True}, "file_budget makes budget= count the whole file"),
    ({"method": "loftq"}, "LoftQ takes one quantization config"),
    ({"method": "loftq", "budget": 3.0, "configs": CONFIGS}, "LoftQ takes one quantization config and no budget"),
    ({"method": "loftq", "configs": NF4, "fisher": "fisher.safetensors"}, "no Fisher matrix.*drop fisher"),
    ({"method": "loftq", "configs": NF4, "file_budget": True}, "drop file_budget"),
    ({"method": "loftq", "configs": NF4, "max_iters": 5}, "LoftQ's alternations are loftq_iters"),
])
def test_invalid_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(QbaraError, match=match):
        LQConfig(**kwargs)


def test_the_valid_shapes_of_a_config():
    assert not LQConfig(budget=2.75).fixed and LQConfig(budget=2.75).configs is None
    candidates = LQConfig(budget=3, configs=iter(CONFIGS))  # any iterable, kept as an ordered tuple
    assert candidates.configs == tuple(CONFIGS) and not candidates.fixed
    assert LQConfig(configs=NF4).fixed and LQConfig(configs=NF4, method="loftq", loftq_iters=3).loftq_iters == 3
    per_layer = {"model.layers.0.mlp.up_proj": NF4}
    assert LQConfig(configs=per_layer).configs == per_layer and LQConfig(configs=per_layer).fixed
    assert LQConfig(budget=3.0, file_budget=False).file_budget is False


def test_a_table_must_match_the_configs_and_iterations_given_with_it():
    model, _ = tiny_llama()
    table = error_table(model, CONFIGS, rank=RANK, iters=2, progress=False)
    assert LQConfig(budget=3.0, table=table, configs=CONFIGS, table_iters=2).table is table
    with pytest.raises(QbaraError, match="other candidate configs"):
        LQConfig(budget=3.0, table=table, configs=CONFIGS[:2])
    with pytest.raises(QbaraError, match="ran 2 iterations per entry, not table_iters=5"):
        LQConfig(budget=3.0, table=table, table_iters=5)
    with pytest.raises(QbaraError, match="computed in mode 'refine', not table_mode='shared'"):
        LQConfig(budget=3.0, table=table, table_mode="shared")


def test_table_mode_chooses_how_the_table_is_computed():
    """table_mode="shared" (the fast approximation) allocates on the shared table, and the report says so."""
    base, _ = tiny_llama()
    model = copy.deepcopy(base)
    prepare(model, LQConfig(budget=3.0, table_mode="shared", **SMALL), ADAPTER)
    table = error_table(copy.deepcopy(base), CONFIGS, rank=RANK, iters=2, dq_mode="shared", cache=False,
                        progress=False)
    assert model.qbara.lq.allocation.indices == table.allocate(3.0).indices
    assert model.qbara.lq.settings["table_mode"] == "shared"


def test_to_dict_round_trips_and_refuses_what_it_cannot_record(tmp_path):
    from qbara.lq.filesize import FileBudget

    per_layer = {"model.layers.0.mlp.up_proj": NF4, "model.layers.0.mlp.down_proj": qlora_config(3)}
    fb = FileBudget(1000.0, 5000, 4000, {"other (f32)": 1000.0})
    for config in (LQConfig(budget=2.75), LQConfig(budget=3, configs=CONFIGS, fisher=tmp_path / "f", seed=3,
                                                   workers=2, table_iters=4, factor_format=FACTOR_CONFIG,
                                                   file_budget=fb),
                   LQConfig(configs=NF4, method="loftq", loftq_iters=2), LQConfig(configs=per_layer, max_iters=7),
                   LQConfig(budget=3.0, table=str(tmp_path / "t.safetensors"), file_budget=True)):
        data = config.to_dict()
        back = LQConfig.from_dict(json.loads(json.dumps(data)))
        assert back.to_dict() == data
        if not isinstance(config.fisher, type(tmp_path)):
            assert back == config
    assert LQConfig.from_dict(LQConfig(configs=per_layer).to_dict()).configs == per_layer
    with pytest.raises(QbaraError, match="unknown LQConfig keys \\['rank'\\]"):
        LQConfig.from_dict({"budget": 3.0, "rank": 8})
    with pytest.raises(QbaraError, match="save it .*save_fisher"):
        LQConfig(budget=3.0, fisher={"x": torch.ones(2, 2)}).to_dict()
    model, _ = tiny_llama()
    table = error_table(model, CONFIGS, rank=RANK, iters=2, cache=False, progress=False)
    with pytest.raises(QbaraError, match="ErrorTable.save"):
        LQConfig(budget=3.0, table=table).to_dict()


def test_the_adapter_config_owns_the_adapter_and_contradictions_are_refused():
    lq = LQConfig(budget=3.0)
    assert lq.adapter_config(ADAPTER) == dataclasses.replace(ADAPTER, init="lq")
    assert lq.adapter_config(dataclasses.replace(ADAPTER, init="lq")).init == "lq"
    loftq = LQConfig(configs=NF4, method="loftq", loftq_iters=3)
    assert loftq.adapter_config(ADAPTER) == dataclasses.replace(ADAPTER, init="loftq", loftq_iters=3)
    assert loftq.adapter_config(dataclasses.replace(ADAPTER, loftq_iters=3)).loftq_iters == 3
    model, _ = tiny_llama()
    with pytest.raises(QbaraError, match="pass an AdapterConfig too"):
        prepare(model, lq)
    with pytest.raises(QbaraError, match="initialise plain LoRA factors; use AdapterConfig\\(method='lora'\\)"):
        prepare(model, lq, AdapterConfig(method="qbara", rank=RANK))
    with pytest.raises(QbaraError, match="init='loftq'\\) contradicts LQConfig\\(method='lq'\\)"):
        prepare(model, lq, dataclasses.replace(ADAPTER, init="loftq"))
    with pytest.raises(QbaraError, match="loftq_iters=2\\) contradicts LQConfig\\(loftq_iters=3\\)"):
        prepare(model, loftq, dataclasses.replace(ADAPTER, loftq_iters=2))
    with pytest.raises(QbaraError, match="set factor_format in it"):
        prepare(model, lq, ADAPTER, factor_format=FACTOR_CONFIG)
    with pytest.raises(QbaraError, match="rank 512 exceeds"):
        prepare(model, lq, AdapterConfig(rank=512))
    with pytest.raises(QbaraError, match="modules= also selects"):
        prepare(model, LQConfig(budget=3.0, **SMALL), AdapterConfig(rank=RANK, target_modules=["q_proj"]),
                modules="all-linear")
    with pytest.raises(QbaraError, match="takes a loaded model"):
        prepare("tiny-llama", NF4, ADAPTER)
    assert all(not isinstance(m, QuantizedLinear) for m in model.modules())  # every refusal before any change


def test_a_table_of_another_rank_or_other_matrices_is_refused():
    model, _ = tiny_llama()
    other_rank = error_table(model, CONFIGS, rank=2, iters=2, progress=False)
    with pytest.raises(QbaraError, match="computed at rank 2, the adapter has rank 4"):
        prepare(model, LQConfig(budget=3.0, table=other_rank), ADAPTER)
    attention = error_table(model, CONFIGS, rank=RANK, iters=2, targets=["q_proj"], progress=False)
    with pytest.raises(QbaraError, match="other matrices"):
        prepare(model, LQConfig(budget=3.0, table=attention), ADAPTER)


# --------------------------------------------------------------------------------------------------
# One path, the same model


def test_lq_lora_equals_the_pieces_by_hand_and_lq_prepare():
    """table -> ILP -> decompositions -> adapters from the factors, put together by hand (as bench/lq_smollm2.py
    once did): the one entry gives the same Q, factors, report and adapter config, and so does lq_prepare."""
    base, _ = tiny_llama()
    model, by_hand, shorthand = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    prepare(model, LQConfig(budget=3.0, seed=2, **SMALL), ADAPTER)

    table = error_table(by_hand, CONFIGS, rank=RANK, iters=2, seed=2, progress=False)
    allocation = table.allocate(3.0)
    factors = quantize_with_factors(by_hand, allocation.configs, RANK, max_iters=3, seed=2, progress=False)
    attach_adapters(by_hand, AdapterConfig(rank=RANK, alpha=ALPHA, init="lq"), factors=factors)
    _assert_same_model(by_hand, model)
    report = model.qbara.lq
    assert report.allocation.indices == allocation.indices and len(set(allocation.indices)) > 1  # a real mix
    assert report.settings["budget"] == 3.0 and report.settings["table_iters"] == 2
    assert report.settings["max_iters"] == 3 and report.settings["seed"] == 2
    assert report.settings["patience"] == LQ_PATIENCE == 3  # the exact table's rule by default
    assert model.qbara.adapter_config.init == "lq"

    lq_prepare(shorthand, 3.0, RANK, alpha=ALPHA, seed=2, progress=False, **SMALL)
    _assert_same_model(model, shorthand)
    assert shorthand.qbara.lq.to_dict() == report.to_dict()
    assert sum(p.requires_grad for p in model.parameters()) == 2 * len(adapter_layers(model))


def test_a_precomputed_table_by_object_or_path_gives_the_same_model(tmp_path):
    base, _ = tiny_llama()
    computed = prepare(copy.deepcopy(base), LQConfig(budget=3.0, **SMALL), ADAPTER)
    table = error_table(base, CONFIGS, rank=RANK, iters=2, progress=False)
    path = table.save(tmp_path / "table.safetensors")
    for given in (table, path):
        model = prepare(copy.deepcopy(base), LQConfig(budget=3.0, table=given, max_iters=3), ADAPTER)
        _assert_same_model(computed, model)
        assert model.qbara.lq.to_dict() == computed.qbara.lq.to_dict()
    with pytest.raises(QbaraError, match="other candidate configs"):  # checked once the file is read
        prepare(copy.deepcopy(base), LQConfig(budget=3.0, table=path, configs=CONFIGS[1:]), ADAPTER)


def test_loftq_is_the_one_format_case_and_equals_the_init_shorthand():
    """Adapters on q/v only: LoftQ there, plain NF4 on the other linears; LQConfig(method="loftq") and
    AdapterConfig(init="loftq") build the same model, and both equal LoftQ put together by hand."""
    base, _ = tiny_llama()
    adapter = AdapterConfig(rank=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    model = prepare(copy.deepcopy(base), LQConfig(configs=NF4, method="loftq", loftq_iters=2), adapter)
    shorthand = prepare(copy.deepcopy(base), NF4, dataclasses.replace(adapter, init="loftq", loftq_iters=2))
    _assert_same_model(shorthand, model)
    assert model.qbara.lq.to_dict() == shorthand.qbara.lq.to_dict()
    assert model.qbara.adapter_config == dataclasses.replace(adapter, init="loftq", loftq_iters=2)

    by_hand = copy.deepcopy(base)
    targets = linear_layer_names(by_hand, ["q_proj", "v_proj"])
    weights = {n: by_hand.get_submodule(n).weight.detach().clone() for n in targets}
    decs = decompose_layers(weights, {n: NF4 for n in targets}, RANK, method="loftq", loftq_iters=2, progress=False)
    layers = adapter_layers(model)
    assert set(layers) == set(targets)
    for n, layer in layers.items():
        assert torch.equal(layer.base.codes, decs[n].qtensor.tensors["codes"])
        torch.testing.assert_close(layer.delta_weight(), decs[n].L1 @ decs[n].L2, rtol=1e-5, atol=1e-6)
    plain = [n for n in linear_layer_names(base, "all-linear") if n not in targets]
    assert plain and all(model.get_submodule(n).quant_config == NF4 for n in plain)
    # LQ-LoRA's decomposition on the same format is another model (best iterate, SVD first).
    lq = prepare(copy.deepcopy(base), LQConfig(configs=NF4, max_iters=3), adapter)
    assert lq.qbara.lq.method == "lq"
    assert any(not torch.equal(lq.get_submodule(n).base.codes, layers[n].base.codes)
               or not torch.equal(lq.get_submodule(n).lora_B.weight, layers[n].lora_B.weight) for n in targets)


def test_lq_on_one_format_with_nf8_factors_equals_the_init_shorthand():
    base, _ = tiny_llama()
    model = prepare(copy.deepcopy(base), LQConfig(configs=NF4, factor_format=FACTOR_CONFIG), ADAPTER)
    shorthand = prepare(copy.deepcopy(base), NF4, dataclasses.replace(ADAPTER, init="lq"), factor_format=FACTOR_CONFIG)
    _assert_same_model(shorthand, model)
    assert model.qbara.lq.to_dict() == shorthand.qbara.lq.to_dict()
    assert model.qbara.lq.settings["factor_format"] == FACTOR_CONFIG.label


def test_a_fisher_reaches_the_table_the_allocation_and_the_factors(tmp_path):
    base, _ = tiny_llama()
    fisher = nonuniform_fisher(base)
    plain = prepare(copy.deepcopy(base), LQConfig(budget=3.0, **SMALL), ADAPTER)
    weighted = prepare(copy.deepcopy(base), LQConfig(budget=3.0, fisher=fisher, **SMALL), ADAPTER)
    assert weighted.qbara.lq.fisher and not plain.qbara.lq.fisher
    assert weighted.qbara.lq.allocation.error != pytest.approx(plain.qbara.lq.allocation.error, rel=1e-3)
    assert weighted.qbara.lq.allocation.indices != plain.qbara.lq.allocation.indices  # the heavy rows move bits
    # ... and the same through a Fisher file and through lq_prepare
    save_fisher(fisher, tmp_path / "fisher.safetensors")
    from_file = prepare(copy.deepcopy(base), LQConfig(budget=3.0, fisher=tmp_path / "fisher.safetensors", **SMALL),
                        ADAPTER)
    _assert_same_model(weighted, from_file)
    shorthand = lq_prepare(copy.deepcopy(base), 3.0, RANK, fisher, alpha=ALPHA, progress=False, **SMALL)
    _assert_same_model(weighted, shorthand)


def test_a_fisher_weights_the_one_format_decompositions():
    """New with LQConfig: Fisher-weighted LQ-LoRA on fixed configs (an allocation made elsewhere, or one format)."""
    base, _ = tiny_llama()
    fisher = nonuniform_fisher(base)
    plain = prepare(copy.deepcopy(base), LQConfig(configs=NF4, max_iters=3), ADAPTER)
    weighted = prepare(copy.deepcopy(base), LQConfig(configs=NF4, max_iters=3, fisher=fisher), ADAPTER)
    targets = linear_layer_names(base, "all-linear")
    weights = {n: base.get_submodule(n).weight.detach() for n in targets}
    decs = decompose_layers(weights, {n: NF4 for n in targets}, RANK, max_iters=3, fisher=fisher, progress=False)
    changed = 0
    for n, layer in adapter_layers(weighted).items():
        torch.testing.assert_close(layer.delta_weight(), decs[n].L1 @ decs[n].L2, rtol=1e-5, atol=1e-6)
        changed += not torch.allclose(layer.delta_weight(), plain.get_submodule(n).delta_weight())
    assert changed == len(targets)
    assert weighted.qbara.lq.fisher and weighted.qbara.lq.allocation is None


def test_a_checkpoint_folder_is_streamed_to_the_same_model(tmp_path):
    model, tokenizer = tiny_llama(seed=0)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lq = LQConfig(budget=3.0, **SMALL)
    eager = prepare(load_model(str(folder))[0], lq, ADAPTER)
    streamed = prepare(folder, lq, ADAPTER)
    _assert_same_model(eager, streamed)
    assert streamed.qbara.lq.to_dict() == eager.qbara.lq.to_dict()
    assert streamed.qbara.loaded_quant is None
    loftq = LQConfig(configs=NF4, method="loftq", loftq_iters=2)
    adapter = AdapterConfig(rank=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    _assert_same_model(prepare(load_model(str(folder))[0], loftq, adapter), prepare(str(folder), loftq, adapter))


def test_configs_holding_a_fisher_compare_by_identity_instead_of_raising():
    fisher = {"layer": torch.ones(2, 2)}
    a = LQConfig(budget=3.0, fisher=fisher)
    assert a == LQConfig(budget=3.0, fisher=fisher)
    assert a != LQConfig(budget=3.0, fisher={"layer": torch.ones(2, 2)}) and a != LQConfig(budget=3.0)
    assert LQConfig(budget=3.0, fisher="f/") == LQConfig(budget=3.0, fisher="f/")


def test_patience_reaches_every_decomposition_and_the_report(monkeypatch):
    """LQConfig.patience is what each matrix's decomposition stops by, and the report records it."""
    layers = importlib.import_module("qbara.lq.layers")
    seen = []
    real = layers.decompose

    def spy(*args, **kwargs):
        seen.append(kwargs["patience"])
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "decompose", spy)
    base, _ = tiny_llama()
    for patience in (1, 5):
        seen.clear()
        model = prepare(copy.deepcopy(base), LQConfig(configs=NF4, max_iters=4, patience=patience), ADAPTER)
        assert len(seen) == len(linear_layer_names(base)) and set(seen) == {patience}
        assert model.qbara.lq.settings["patience"] == patience
