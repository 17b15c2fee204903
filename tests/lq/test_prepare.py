"""Model-level LQ-LoRA and LoftQ init: the model at step 0 is Q + L1 L2 with s = alpha/rank != 1, checked
against independent references (plain quantization, a dense SVD, a dense model holding Q + L1 L2)."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from qbara import AdapterConfig, QbaraError, QuantConfig, load_adapter, lq_prepare, prepare, quantize
from qbara.adapters.attach import adapter_layers, attach_adapters
from qbara.adapters.io import save_adapter
from qbara.lq.configs import qlora_config
from qbara.lq.layers import decompose_layers
from qbara.lq.loftq import loftq
from qbara.models import tiny_llama
from qbara.models.loader import load_model
from qbara.models.tiny import tiny_qwen2
from qbara.native import save_quantized
from tests.helpers import free_port
from tests.lq.dist_worker import small_weights

NF4 = QuantConfig("nf4", block_size=32)
RANK, ALPHA = 4, 8.0  # s = 2: a missing 1/s would double the low-rank part


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def _effective_weight(layer) -> torch.Tensor:
    return layer.base.dequantize() + layer.delta_weight()


def _ids():
    return torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(3))


def _dense_twin(dense, weights: dict):
    """The dense model with the given weights swapped in (an independent forward pass)."""
    twin = copy.deepcopy(dense)
    with torch.no_grad():
        for n, w in weights.items():
            twin.get_submodule(n).weight.copy_(w)
    return twin


def _truncated_svd(X, rank):
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_lq_init_model_at_step_0_is_q_plus_l1l2(build):
    model, _ = build()
    dense = copy.deepcopy(model)
    prepare(model, NF4, AdapterConfig(rank=RANK, alpha=ALPHA, init="lq"))
    layers = adapter_layers(model)
    weights = {n: dense.get_submodule(n).weight.detach() for n in layers}
    decs = decompose_layers(weights, {n: NF4 for n in layers}, RANK, progress=False)
    for n, layer in layers.items():
        torch.testing.assert_close(layer.lora_B.weight @ layer.lora_A.weight * layer.scaling,
                                   decs[n].L1 @ decs[n].L2, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.base.codes, decs[n].qtensor.tensors["codes"])
        # The decomposition beats plain quantization of the same matrix.
        plain = float((weights[n] - quantize(weights[n], NF4).dequantize()).norm())
        assert float((weights[n] - _effective_weight(layer)).norm()) <= plain
    twin = _dense_twin(dense, {n: decs[n].reconstruct() for n in layers})
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, twin(_ids()).logits, rtol=1e-4, atol=1e-5)
    assert model.qbara.lq.method == "lq" and len(model.qbara.lq.layers) == len(layers)


def test_loftq_one_iteration_is_quantize_then_svd_of_the_error():
    W = small_weights()["layer2.proj"]  # 128 x 64
    d = loftq(W, NF4, rank=RANK, iters=1)
    plain = quantize(W, NF4)
    assert torch.equal(d.qtensor.tensors["codes"], plain.tensors["codes"])
    reference = _truncated_svd(W - plain.dequantize(), RANK).float()
    torch.testing.assert_close(d.L1 @ d.L2, reference, rtol=1e-3, atol=1e-5)
    assert d.best_iter == 0 and len(d.errors) == 1


def test_loftq_keeps_the_last_of_several_alternations():
    W = small_weights()["layer6.proj"]
    d = loftq(W, qlora_config(2), rank=RANK, iters=3)
    assert len(d.errors) == 3 and d.best_iter == 2
    assert d.error == pytest.approx(float((W - d.reconstruct()).norm()), rel=1e-4)


def test_loftq_prepare_divides_the_factors_by_s():
    model, _ = tiny_llama()
    dense = copy.deepcopy(model)
    prepare(model, NF4, AdapterConfig(rank=RANK, alpha=ALPHA, init="loftq"))
    for n, layer in adapter_layers(model).items():
        W = dense.get_submodule(n).weight.detach()
        Q = quantize(W, NF4)
        assert torch.equal(layer.base.codes, Q.tensors["codes"])  # LoftQ-1: Q is quantize(W)
        torch.testing.assert_close(layer.delta_weight(), _truncated_svd(W - Q.dequantize(), RANK).float(),
                                   rtol=1e-3, atol=1e-5)
    assert model.qbara.lq.method == "loftq"


def test_loftq_init_is_closer_to_the_dense_model_than_plain_qlora():
    model, _ = tiny_llama()
    plain = copy.deepcopy(model)
    dense = copy.deepcopy(model)
    prepare(model, QuantConfig("nf2", block_size=32), AdapterConfig(rank=16, alpha=ALPHA, init="loftq"))
    prepare(plain, QuantConfig("nf2", block_size=32), AdapterConfig(rank=16, alpha=ALPHA))
    with torch.no_grad():
        ref = dense(_ids()).logits
        assert (model(_ids()).logits - ref).norm() < 0.8 * (plain(_ids()).logits - ref).norm()


def test_lq_prepare_allocates_within_the_budget_and_starts_from_the_decomposition():
    model, _ = tiny_llama()
    dense = copy.deepcopy(model)
    configs = [qlora_config(b) for b in (2, 3, 4)]
    lq_prepare(model, budget=3.0, rank=RANK, alpha=ALPHA, configs=configs, table_iters=3, progress=False)
    report = model.qbara.lq
    allocation = report.allocation
    assert report.bits_per_param <= 3.0 + 1e-9
    assert len(set(c.label for c in allocation.configs.values())) > 1  # a real mix at this budget
    layers = adapter_layers(model)
    assert set(layers) == set(allocation.configs)
    weights = {n: dense.get_submodule(n).weight.detach() for n in layers}
    decs = decompose_layers(weights, allocation.configs, RANK, progress=False)
    total = 0.0
    for n, layer in layers.items():
        assert layer.base.quant_config == allocation.configs[n]
        torch.testing.assert_close(_effective_weight(layer), decs[n].reconstruct(), rtol=1e-5, atol=1e-6)
        total += float((weights[n] - _effective_weight(layer)).pow(2).sum())
    assert report.total_error == pytest.approx(total, rel=1e-3)
    assert sum(p.requires_grad for p in model.parameters()) == 2 * len(layers)


def test_lq_adapter_reloads_only_on_its_own_quantized_base(tmp_path):
    model, tok = tiny_llama()
    lq_prepare(model, budget=3.5, rank=RANK, alpha=ALPHA, configs=[qlora_config(b) for b in (3, 4)],
               table_iters=2, progress=False)
    save_quantized(model, tok, tmp_path / "base", base_only=True)
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = load_model(str(tmp_path / "base"))
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(_ids()).logits, model(_ids()).logits)
    with pytest.raises(QbaraError, match="starts from an 'lq' decomposition"):
        load_adapter(tiny_llama()[0], tmp_path / "adapter")
    # Another quantization of the same weights is a different base.
    other, _ = tiny_llama()
    prepare(other, qlora_config(4))
    save_quantized(other, tok, tmp_path / "plain")
    with pytest.raises(QbaraError, match="different base model"):
        load_adapter(load_model(str(tmp_path / "plain"))[0], tmp_path / "adapter")


def test_fisher_weighted_lq_prepare_from_a_file(tmp_path):
    from qbara.lq.fisher import save_fisher
    from qbara.targets import linear_layer_names

    model, _ = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(model.get_submodule(n).weight.shape, generator=gen)
              for n in linear_layer_names(model, "all-linear")}
    save_fisher(fisher, tmp_path / "fisher.safetensors")
    lq_prepare(model, budget=3.5, rank=RANK, fisher=tmp_path / "fisher.safetensors",
               configs=[qlora_config(b) for b in (3, 4)], table_iters=2, progress=False)
    assert model.qbara.lq.fisher and model.qbara.lq.allocation.bits_per_param <= 3.5


def test_init_refusals():
    model, _ = tiny_llama()
    with pytest.raises(QbaraError, match="decomposition of the dense weights"):
        attach_adapters(model, AdapterConfig(rank=RANK, init="lq"))
    prepare(model, NF4)
    with pytest.raises(QbaraError, match="already quantized"):
        prepare(model, {"model.layers.0.mlp.up_proj": NF4}, AdapterConfig(rank=RANK, init="loftq",
                                                                          target_modules=("up_proj",)))
    with pytest.raises(QbaraError, match="no Fisher-weighted variant"):
        decompose_layers(small_weights(), {n: NF4 for n in small_weights()}, RANK, method="loftq",
                         fisher={n: torch.ones_like(w) for n, w in small_weights().items()})
    with pytest.raises(QbaraError, match="initialises plain LoRA"):
        AdapterConfig(method="qbara", init="lq")
    fresh, _ = tiny_llama()
    with pytest.raises(QbaraError, match="needs every adapter target quantized"):
        prepare(fresh, {"model.layers.0.mlp.up_proj": NF4}, AdapterConfig(rank=RANK, init="loftq"))


def test_prepare_streams_a_name_and_refuses_one_without_safetensors_shards(tmp_path):
    """A name given to `qbara.prepare` with an LQConfig (or the init= alias) is streamed from its shards: a folder
    without them is refused."""
    from qbara.lq import LQConfig

    with pytest.raises(QbaraError, match="not a folder of safetensors shards"):
        prepare(tmp_path, NF4, AdapterConfig(rank=RANK, init="loftq"))
    with pytest.raises(QbaraError, match="not a folder of safetensors shards"):  # the top level streams it
        prepare(tmp_path, LQConfig(budget=3.0), AdapterConfig(rank=RANK))


def test_two_gloo_ranks_decompose_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    from tests.lq import dist_worker

    mp.spawn(dist_worker.run_decompose, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    weights = small_weights()
    single = decompose_layers(weights, {n: qlora_config(3 if i % 2 else 4) for i, n in enumerate(weights)}, 4,
                              max_iters=5, progress=False)
    for rank in (0, 1):
        tensors = load_file(tmp_path / f"decomp{rank}.safetensors")
        meta = json.loads((tmp_path / f"decomp{rank}.json").read_text())
        for n, d in single.items():
            assert torch.equal(tensors[f"{n}.L1"], d.L1) and torch.equal(tensors[f"{n}.L2"], d.L2)
            for k, t in d.qtensor.tensors.items():
                assert torch.equal(tensors[f"{n}.{k}"], t)
            assert meta[n] == [d.errors, d.best_iter]
