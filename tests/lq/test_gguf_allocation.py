"""LQ-LoRA's allocation over GGML block formats under a file-size budget (issue #13): the ILP against brute
force with the fixed part of the file, file budgets of real models, sizes measured from the quantized buffers,
and the (Fisher-weighted) decomposition with a gguf Q."""
import itertools
import re

import numpy as np
import pytest
import torch

from qbara import lq_prepare
from qbara.errors import QbaraError
from qbara.lq.configs import gguf_configs
from qbara.lq.decompose import decompose, weighted_error
from qbara.lq.filesize import FileBudget, tensor_bits
from qbara.lq.fisher import fisher_information
from qbara.lq.ilp import allocate, budget_range, matrix_budget
from qbara.lq.tables import error_table, matrix_costs
from qbara.models import tiny_llama
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant import QuantConfig, quantize

GGUF_BITS = np.array([c.bits_per_param for c in gguf_configs()])
K_QUANT = np.array([c.block_size == 256 for c in gguf_configs()])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def _tiny_256(tie: bool = False):
    """One layer whose every linear has d_in % 256 == 0 (K-quants fit all of them)."""
    return tiny_llama(hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2, tie_word_embeddings=tie)


def test_gguf_configs_are_the_fourteen_ggml_formats_by_bits():
    configs = gguf_configs()
    assert [c.format.removeprefix("gguf:") for c in configs] == [
        "q2_k", "iq3_xxs", "iq3_s", "q3_k", "iq4_xs", "iq4_nl", "q4_0", "q4_k", "q4_1", "q5_0", "q5_k", "q5_1", "q6_k",
        "q8_0"]
    assert [c.bits_per_param for c in configs] == [2.625, 3.0625, 3.4375, 3.4375, 4.25, 4.5, 4.5, 4.5, 5.0, 5.5, 5.5,
                                                   6.0, 6.5625, 8.5]
    assert gguf_configs(["Q6_K", "gguf:q4_k", "q4_k"]) == [QuantConfig("gguf:q4_k"), QuantConfig("gguf:q6_k")]
    with pytest.raises(QbaraError, match="unknown GGML formats"):
        gguf_configs(["q4_2"])
    costs = matrix_costs(torch.randn(32, 96) * 0.02, configs, rank=2, iters=2)  # 96: no K-quant fits
    assert torch.isinf(costs[torch.tensor(K_QUANT)]).all() and torch.isfinite(costs[~torch.tensor(K_QUANT)]).all()


def _brute_file(costs, bits, numels, budget, fixed, total):
    best, best_choice = np.inf, None
    for choice in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        stored = sum(numels[i] * bits[c] for i, c in enumerate(choice)) + fixed
        if stored <= budget * total * (1 + 1e-12):
            cost = sum(costs[i, c] for i, c in enumerate(choice))
            if cost < best:
                best, best_choice = cost, choice
    return best, best_choice


@pytest.mark.parametrize("n", [3, 4])
def test_file_budget_ilp_equals_brute_force(n):
    """Σ numel_i bits_i + F <= budget T: the ILP's optimum is brute force's, over the ten gguf formats (4
    matrices: a random 6 of them), with K-quants unusable for some matrices (+inf)."""
    rng = np.random.default_rng(n)
    for trial in range(12):
        cols = np.arange(10) if n == 3 else np.sort(rng.choice(10, size=6, replace=False))
        bits = GGUF_BITS[cols]
        costs = rng.uniform(0.1, 10, size=(n, 1)) * np.exp(-bits[None, :] * rng.uniform(0.3, 1.2, size=(n, 1)))
        costs *= rng.uniform(0.7, 1.3, size=costs.shape)
        no_k = rng.random(n) < 0.4
        costs[np.ix_(no_k, K_QUANT[cols])] = np.inf
        if not np.isfinite(costs).any(axis=1).all():
            costs[:, 0] = np.where(np.isfinite(costs).any(axis=1), costs[:, 0], 1.0)
        numels = rng.integers(1, 40, size=n) * 256 * 32
        total = int(numels.sum() * rng.uniform(1.05, 1.6))  # the embedding, norms, ... besides the matrices
        fixed = float((total - numels.sum()) * rng.choice([8.5, 16.0, 32.0]) + rng.integers(0, 10**6))
        low, high = budget_range(costs, bits, numels, fixed_bits=fixed, total_params=total)
        budget = float(rng.uniform(low, high + 0.2))
        choice = allocate(costs, bits, numels, budget, fixed_bits=fixed, total_params=total)
        stored = float((numels * bits[choice]).sum()) + fixed
        assert stored <= budget * total * (1 + 1e-12)
        best, _ = _brute_file(costs, bits, numels, budget, fixed, total)
        assert sum(costs[i, c] for i, c in enumerate(choice)) == pytest.approx(best, rel=1e-9)
        # The equivalent matrices-only budget gives the same allocation.
        assert allocate(costs, bits, numels, matrix_budget(budget, numels, fixed, total)) == choice
        # A file budget below the smallest feasible one is refused, naming it.
        smallest = f"smallest feasible file budget is {np.ceil(low * 1e4) / 1e4:.4f}"
        with pytest.raises(QbaraError, match=re.escape(smallest)):
            allocate(costs, bits, numels, low - 0.01, fixed_bits=fixed, total_params=total)


def test_file_terms_default_to_the_matrix_budget_and_are_checked():
    costs = np.array([[5.0, 1.0, 0.5], [4.0, 2.0, 0.1]])
    bits, numels = np.array([2.0, 3.0, 4.0]), np.array([100, 300])
    assert allocate(costs, bits, numels, 2.5, fixed_bits=0.0) == allocate(costs, bits, numels, 2.5) == [2, 0]
    assert budget_range(costs, bits, numels, fixed_bits=0, total_params=400) == pytest.approx((2.0, 4.0))
    # 600 more parameters at 8 bits: a 5.0 file budget leaves (5 * 1000 - 4800) / 400 = 0.5 bits: infeasible.
    with pytest.raises(QbaraError, match=r"smallest feasible file budget is 5\.6000"):
        allocate(costs, bits, numels, 5.0, fixed_bits=4800, total_params=1000)
    assert allocate(costs, bits, numels, 5.8, fixed_bits=4800, total_params=1000) == [2, 0]  # 2.5 bits left
    assert allocate(costs, bits, numels, 5.7, fixed_bits=4800, total_params=1000) == [1, 0]  # 2.25 bits left
    with pytest.raises(QbaraError, match="total_params"):
        allocate(costs, bits, numels, 3.0, total_params=300)
    with pytest.raises(QbaraError, match="fixed_bits"):
        allocate(costs, bits, numels, 3.0, fixed_bits=-1.0)


@pytest.mark.parametrize("tie", [False, True])
def test_file_budget_of_a_model_counts_every_tensor_once(tie):
    model, _ = _tiny_256(tie)
    rank = 4
    fb = FileBudget.of_model(model, adapter_format="f32", rank=rank, metadata_bytes=1000)
    embed = model.get_input_embeddings().weight
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert fb.matrix_params == sum(m.weight.numel() for m in linears)
    assert fb.total_params == sum(p.numel() for p in model.parameters())  # tied: once
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    expected = {"token_embd (q8_0)": 8.5 * embed.numel(), "other (f32)": 32.0 * norms,
                "adapter factors (f32)": 32.0 * rank * sum(sum(m.weight.shape) for m in linears),
                "metadata": 8000.0}
    if not tie:
        expected["output (q8_0)"] = 8.5 * model.get_output_embeddings().weight.numel()
    assert fb.parts == pytest.approx(expected)
    assert fb.fixed_bits == pytest.approx(sum(expected.values()))
    assert FileBudget.of_model(model, embedding_format="f16").parts["token_embd (f16)"] == 16 * embed.numel()
    with pytest.raises(QbaraError, match="rank"):
        FileBudget.of_model(model, adapter_format="f32")
    half = FileBudget.of_model(model, adapter_format="f16", rank=rank, metadata_bytes=1000).parts
    assert half["adapter factors (f16)"] == expected["adapter factors (f32)"] / 2  # export_gguf_lora(dtype="f16")
    for unwritten in ("q4_0", "bf16"):  # export_gguf_lora writes F32 or F16 adapter tensors
        with pytest.raises(QbaraError, match="adapter_format"):
            FileBudget.of_model(model, adapter_format=unwritten, rank=4)
    with pytest.raises(QbaraError, match="unknown GGUF tensor type"):
        FileBudget.of_model(model, embedding_format="q4_2")
    with pytest.raises(QbaraError, match="q6_k"):  # 100-wide rows: no 256-blocks
        tensor_bits("q6_k", (10, 100), "token_embd")


def _stored_bits(model, rank: int) -> float:
    """Bits of the GGUF tensors, measured: the packed gguf buffers of every QuantizedLinear, the embedding
    quantized to Q8_0, F32 norms, the F32 factors of the adapters (as export_gguf_lora writes them) (their A and B as stored)."""
    from qbara.adapters.attach import adapter_layers

    bits = 8.0 * sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))
    embed = model.get_input_embeddings().weight.detach()
    bits += 8.0 * quantize(embed, QuantConfig("gguf:q8_0"), "token_embd").nbytes
    out = model.get_output_embeddings().weight
    if out is not model.get_input_embeddings().weight:
        bits += 8.0 * quantize(out.detach(), QuantConfig("gguf:q8_0"), "output").nbytes
    bits += 32.0 * sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    for layer in adapter_layers(model).values():
        factors = list(layer.adapter_parameters().values())
        assert len(factors) == 2 and all(rank in p.shape for p in factors)
        bits += 8.0 * sum(p.detach().to(torch.float32).nbytes for p in factors)
    return bits


def test_lq_prepare_under_a_file_budget_stores_at_most_the_budget():
    """lq_prepare(configs=gguf_configs(), file_budget=...): Q in gguf formats, and the file measured from the
    actual buffers (packed blocks, Q8_0 embedding, F32 norms, F32 adapter) fits the budget, to the bit."""
    rank = 4
    model, _ = _tiny_256()
    fb = FileBudget.of_model(model, adapter_format="f32", rank=rank)
    total = fb.total_params
    table = error_table(model, gguf_configs(), rank=rank, iters=2, progress=False)
    low, high = table.budget_range(fb)
    budget = low + 0.4 * (high - low)
    expected = table.allocate(budget, fb)
    assert len(set(expected.counts())) > 1  # a real mix
    lq_prepare(model, budget=budget, rank=rank, alpha=8.0, table=table, file_budget=fb, max_iters=3, progress=False)
    allocation = model.qbara.lq.allocation
    assert allocation.indices == expected.indices and allocation.file is fb and allocation.budget == budget
    kinds = {m.quant_config.kind for m in model.modules() if isinstance(m, QuantizedLinear)}
    assert kinds == {"gguf"}
    stored = _stored_bits(model, rank)
    assert stored <= budget * total
    assert stored == pytest.approx(8 * allocation.file_bytes, rel=1e-12)
    assert allocation.file_bits_per_param == pytest.approx(stored / total, rel=1e-12)
    assert model.qbara.lq.settings["file_budget"]["total_params"] == total
    with pytest.raises(QbaraError, match="infeasible"):
        table.allocate(low - 0.05, fb)
    other = FileBudget(fb.fixed_bits, fb.total_params, fb.matrix_params - 1)
    with pytest.raises(QbaraError, match="target modules"):
        table.allocate(budget, other)


def test_lq_prepare_file_budget_true_uses_the_model_defaults():
    model, _ = _tiny_256(tie=True)
    fb = FileBudget.of_model(model)
    lq_prepare(model, budget=6.0, rank=2, configs=gguf_configs(["q4_0", "q4_k", "q8_0"]), file_budget=True,
               table_iters=2, max_iters=2, progress=False)
    allocation = model.qbara.lq.allocation
    assert allocation.file == fb and allocation.file_bits_per_param <= 6.0
    assert allocation.to_dict()["file_budget"]["fixed_bits"] == fb.fixed_bits
    with pytest.raises(QbaraError, match="file_budget must be"):
        lq_prepare(_tiny_256()[0], budget=6.0, rank=2, configs=gguf_configs(), file_budget="yes", progress=False)


def test_gguf_error_table_with_and_without_fisher_and_the_decomposition():
    """The Fisher path unchanged with gguf configs: tables build (finite where shapes fit) with and without a
    Fisher, and W ≈ Q + L1 L2 with Q in a gguf format runs, its error the Fisher-weighted one it reports."""
    model, _ = _tiny_256()
    seqs = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    fisher = fisher_information(model, seqs, progress=False)
    configs = gguf_configs()
    plain = error_table(model, configs, rank=4, iters=2, cache=False, progress=False)
    weighted = error_table(model, configs, rank=4, iters=2, fisher=fisher, cache=False, progress=False)
    for table in (plain, weighted):
        assert table.costs.shape == (7, len(configs)) and torch.isfinite(table.costs).all() and (table.costs > 0).all()
    assert not torch.allclose(plain.costs, weighted.costs)
    # Lower-bit formats err more (each matrix: q2_k > q4_k > q8_0).
    j = {c.format: i for i, c in enumerate(configs)}
    assert (plain.costs[:, j["gguf:q2_k"]] > plain.costs[:, j["gguf:q4_k"]]).all()
    assert (plain.costs[:, j["gguf:q4_k"]] > plain.costs[:, j["gguf:q8_0"]]).all()

    name = "model.layers.0.mlp.down_proj"
    W = model.get_submodule(name).weight.detach()
    for fmt in ("gguf:q4_k", "gguf:q4_1"):
        cfg = QuantConfig(fmt)
        dec = decompose(W, cfg, rank=4, max_iters=5, fisher=fisher[name])
        assert dec.qtensor.config == cfg and dec.qtensor.nbytes * 8 == W.numel() * cfg.bits_per_param
        assert weighted_error(W - dec.reconstruct(), fisher[name]) == pytest.approx(dec.error, rel=1e-4)
        assert dec.error == min(dec.errors)
        plain_q = decompose(W, cfg, rank=0)
        assert torch.equal(plain_q.qtensor.tensors["codes"], quantize(W, cfg).tensors["codes"])


def test_streamed_lq_prepare_takes_the_same_file_budget(tmp_path):
    """A checkpoint folder (tied embeddings): FileBudget.of_checkpoint equals of_model of the loaded model, and
    lq_prepare(folder, file_budget=True) allocates and records as lq_prepare(model, file_budget=True)."""
    from qbara.models.loader import load_model
    from qbara.models.sources import checkpoint_file_budget

    model, tokenizer = _tiny_256(tie=True)
    folder = tmp_path / "tiny-tied"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    eager, _ = load_model(str(folder))
    assert checkpoint_file_budget(folder) == FileBudget.of_model(eager)
    assert "output (q8_0)" not in checkpoint_file_budget(folder).parts  # tied: counted once
    kwargs = dict(configs=gguf_configs(["q2_k", "q4_0", "q4_k", "q8_0"]), table_iters=2, max_iters=2,
                  file_budget=True, progress=False)
    lq_prepare(eager, 6.0, 2, **kwargs)
    streamed = lq_prepare(folder, 6.0, 2, **kwargs)
    assert streamed.qbara.lq.allocation.indices == eager.qbara.lq.allocation.indices
    assert streamed.qbara.lq.to_dict() == eager.qbara.lq.to_dict()
    assert streamed.qbara.lq.allocation.file_bits_per_param <= 6.0
    with pytest.raises(QbaraError, match="not a safetensors checkpoint folder"):
        checkpoint_file_budget(tmp_path / "nowhere")
