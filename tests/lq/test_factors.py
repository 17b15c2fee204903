"""NF8 storage of LQ-LoRA's low-rank factors and the bits account of Q plus factors."""
import copy

import pytest
import torch

from qbara import AdapterConfig, QuantConfig
from qbara.adapters.attach import attach_adapters
from qbara.lq.factors import FACTOR_CONFIG, bits_account, quantize_factor, quantize_factors
from qbara.models import tiny_llama
from qbara.models.lq import quantize_with_factors
from qbara.quant import quantize
from qbara.quant.nf import nf_levels


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def test_factor_config_is_nf8_at_8_127_bits():
    assert FACTOR_CONFIG.format == "nf8" and FACTOR_CONFIG.block_size == 64
    assert round(FACTOR_CONFIG.bits_per_param, 3) == 8.127


@pytest.mark.parametrize("shape", [(96, 4), (4, 200), (3, 7)])  # ranks below the block size; padding
def test_quantize_factor_is_nf8_of_the_flattened_factor_with_the_stored_bits(shape):
    g = torch.Generator().manual_seed(shape[0])
    factor = torch.randn(shape, generator=g)
    q, bits = quantize_factor(factor)
    assert q.shape == factor.shape and q.dtype == factor.dtype
    n_blocks = -(-factor.numel() // 64)
    padded = torch.zeros(n_blocks * 64)
    padded[:factor.numel()] = factor.reshape(-1)
    qt = quantize(padded.view(n_blocks, 64), FACTOR_CONFIG)
    assert torch.equal(q.reshape(-1), qt.dequantize().reshape(-1)[:factor.numel()])
    # Brute force: each value is the nearest NF8 level times its block's stored scale.
    scales = qt.scales().repeat_interleave(64)[:factor.numel()]
    candidates = nf_levels(8)[None, :] * scales[:, None]
    best = (factor.reshape(-1)[:, None] - candidates).abs().min(dim=1).values
    assert torch.all((factor.reshape(-1) - q.reshape(-1)).abs() <= best + 1e-7)
    assert float((q - factor).norm() / factor.norm()) < 1e-2
    assert bits == 8 * qt.nbytes
    assert bits == pytest.approx(n_blocks * 64 * FACTOR_CONFIG.bits_per_param, abs=32 + 32 * n_blocks / 256 + 32)


def test_bits_account_counts_q_and_factors():
    nf3 = QuantConfig("nf3", 64, dq_bits=8, dq_dtype="fp32", dq_block_size=256)
    layers = {"a": (nf3, 4096 * 4096), "b": (QuantConfig("nf2", 16, dq_bits=4), 4096 * 11008)}
    factors = {"a": (torch.zeros(4096, 64), torch.zeros(64, 4096)), "b": (torch.zeros(11008, 64), torch.zeros(64, 4096))}
    _, factor_bits = quantize_factors(factors)
    acc = bits_account(layers, factor_bits)
    params = 4096 * 4096 + 4096 * 11008
    q_bits = nf3.bits_per_param * 4096 * 4096 + layers["b"][0].bits_per_param * 4096 * 11008
    assert acc.params == params and acc.quantized_bits_per_param == pytest.approx(q_bits / params)
    factor_numel = 64 * (4096 + 4096 + 11008 + 4096)
    assert acc.factor_bits_per_param == pytest.approx(factor_numel * 8.127 / params, rel=1e-3)
    assert acc.bits_per_param == pytest.approx(acc.quantized_bits_per_param + acc.factor_bits_per_param)


def test_nf8_factors_change_step0_logits_little():
    """NF8 factors move the step-0 logits by ~0.5 % relative on tiny-llama (the factors' own NF8 error; the
    issue's 1e-3 target is not reachable at 8.127 bits: SmolLM2 measures 3.4e-3), a few percent of what the
    quantization itself moves them."""
    model, _ = tiny_llama()
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    factors = quantize_with_factors(model, QuantConfig("nf3", block_size=32), 8, progress=False)
    nf8, factor_bits = quantize_factors(factors)
    exact, stored = copy.deepcopy(model), model
    attach_adapters(exact, AdapterConfig(rank=8, alpha=16.0, init="lq"), factors=factors)
    attach_adapters(stored, AdapterConfig(rank=8, alpha=16.0, init="lq"), factors=nf8)
    with torch.no_grad():
        a, b, d = exact(ids).logits, stored(ids).logits, dense(ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 1e-2
    assert float((a - b).norm()) < 0.1 * float((a - d).norm())
    acc = bits_account(model.qbara.lq, factor_bits)
    assert acc.quantized_bits_per_param == pytest.approx(model.qbara.lq.bits_per_param)
    numel = sum(l1.numel() + l2.numel() for l1, l2 in factors.values())
    assert factor_bits >= numel * 8.127
    assert acc.bits_per_param == pytest.approx(acc.quantized_bits_per_param + factor_bits / acc.params)
