import itertools

import pytest
import torch

from qbara import QbaraError, QuantConfig, quantize
from qbara.quant.gptq import gptq_quantize, hessian_accumulate, output_error
from qbara.quant.intk import quantize_int


def _correlated_inputs(d_in: int, n: int, seed: int) -> torch.Tensor:
    """(n, d_in) inputs with strongly correlated features, as a transformer's hidden states have."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g) * 0.5 + torch.eye(d_in) * 2
    return torch.randn(n, d_in, generator=g) @ mixing


@pytest.mark.parametrize("config, d_out", [
    (QuantConfig("int4", 32), 48), (QuantConfig("int3", 64), 20), (QuantConfig("int2", 16), 8),
    (QuantConfig("int8", 32), 16), (QuantConfig("int4", 32, minimum_dtype="fp32"), 24), (QuantConfig("int5", 32), 16)])
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_gives_round_to_nearest_exactly(config, d_out, act_order):
    """With uncorrelated inputs no error moves to other columns: GPTQ is RTN, buffer for buffer."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(d_out, 128, generator=g)
    diag = torch.rand(128, generator=g) + 0.1
    diag[[3, 77]] = 0.0  # inputs that never fire
    gptq = gptq_quantize(weight, torch.diag(diag), config, act_order=act_order)
    rtn = quantize(weight, config)
    assert gptq.tensors.keys() == rtn.tensors.keys()
    for key, value in rtn.tensors.items():
        assert gptq.tensors[key].dtype == value.dtype and torch.equal(gptq.tensors[key], value), key


@pytest.mark.parametrize("config", [QuantConfig("int4", 32), QuantConfig("int3", 64), QuantConfig("int2", 32)])
def test_output_error_below_round_to_nearest_on_every_seed(config):
    """Correlated inputs: GPTQ's ||(W - Ŵ) X||² is below RTN's on each seed, with and without act-order."""
    for seed in range(5):
        x = _correlated_inputs(256, 2048, seed)
        weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(100 + seed))
        hessian, n = hessian_accumulate(None, 0, x)
        rtn = output_error(weight, quantize(weight, config).dequantize(), hessian)
        for act_order in (False, True):
            gptq = output_error(weight, gptq_quantize(weight, hessian, config, act_order=act_order).dequantize(),
                                hessian)
            assert gptq < rtn, (seed, act_order, gptq, rtn)
        # the objective as the data defines it: mean ||ΔW x||² over the samples
        approx = gptq_quantize(weight, hessian, config).dequantize()
        direct = ((weight - approx) @ x.T).pow(2).sum() / n
        assert direct.item() == pytest.approx(output_error(weight, approx, hessian), rel=1e-3)


def test_hessian_accumulates_the_mean_over_batches():
    x = _correlated_inputs(32, 300, 0)
    h, n = hessian_accumulate(None, 0, x[:100].reshape(10, 10, 32))
    h, n = hessian_accumulate(h, n, x[100:])
    assert n == 300
    torch.testing.assert_close(h, 2 * x.T @ x / 300, rtol=1e-5, atol=1e-4)
    with pytest.raises(QbaraError, match="features"):
        hessian_accumulate(h, n, x[:, :16])


def _greedy_least_squares(weight: torch.Tensor, data: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Reference GPTQ without the Hessian-inverse formula: after each column is quantized, the columns left are
    re-solved directly, min ||(W - Ŵ) data|| by least squares over them with the quantized ones fixed
    (float64); each group's grid is set from the weights as they are when the group starts. Returns Ŵ."""
    w, data = weight.double(), data.double()
    current, values = w.clone(), torch.empty_like(w)
    qmax, group = 2 ** config.bits - 1, config.block_size
    for j in range(w.shape[1]):
        if j % group == 0:
            _, scale, minimum = quantize_int(current[:, j:j + group].float(), config.bits, group)
            s, m = scale.double(), minimum.double()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.where(s > 0, torch.round((current[:, j] - m) / safe).clamp(0, qmax), torch.zeros_like(s))
        values[:, j] = q * s + m
        if j + 1 < w.shape[1]:
            fixed = (w[:, :j + 1] - values[:, :j + 1]) @ data[:j + 1]  # residual of the quantized columns
            shift = torch.linalg.lstsq(data[j + 1:].T, -fixed.T).solution.T  # (W_F - Ŵ_F) that best cancels it
            current[:, j + 1:] = w[:, j + 1:] - shift
    return values


def _damped_data(x: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, data) with data dataᵀ = H + damp·mean(diag H)·I: the samples scaled by √(2/n), then √λ·I."""
    hessian, n = hessian_accumulate(None, 0, x)
    lam = damp * float(torch.diagonal(hessian).mean())
    data = torch.cat([x.T.double() * (2.0 / n) ** 0.5, torch.eye(x.shape[1], dtype=torch.float64) * lam ** 0.5], 1)
    return hessian, data


def test_first_step_update_is_the_least_squares_fit_of_the_remaining_columns():
    """2 x 4 weight, one group of 4, 2 bits: after column 0 is rounded, GPTQ's Cholesky-row update of columns 1..3
    equals the direct least-squares solve over those columns; the whole greedy pass agrees too."""
    config = QuantConfig("int2", 4)
    for seed in range(4):
        x = _correlated_inputs(4, 64, seed)
        weight = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        hessian, data = _damped_data(x)
        # one step by the paper's formula: δ_F = -(w_0 - q_0) / [H⁻¹]_00 · [H⁻¹]_0F (H dampened)
        h_inv = torch.linalg.inv(data @ data.T)
        _, scale, minimum = quantize_int(weight, 2, 4)
        s, m = scale.double(), minimum.double()
        value0 = torch.round((weight[:, 0].double() - m) / s).clamp(0, 3) * s + m
        step = -((weight[:, 0].double() - value0) / h_inv[0, 0])[:, None] * h_inv[0, 1:][None]
        fixed = (weight[:, :1].double() - value0[:, None]) @ data[:1]
        direct = -torch.linalg.lstsq(data[1:].T, -fixed.T).solution.T  # Ŵ_F - W_F
        torch.testing.assert_close(step, direct, rtol=1e-8, atol=1e-10)
        # the full pass: gptq_quantize against the greedy least-squares reference
        ours = gptq_quantize(weight, hessian, config).dequantize().double()
        torch.testing.assert_close(ours, _greedy_least_squares(weight, data, config), rtol=0, atol=1e-4)
        # greedy, not optimal: never below the best of all 4⁴ codes per row on the same grid
        grid = m[:, None] + s[:, None] * torch.arange(4, dtype=torch.float64)
        best = sum(min(_objective(weight[r], grid[r, list(c)], data) for c in itertools.product(range(4), repeat=4))
                   for r in range(2))  # rows are independent
        assert best <= _objective(weight, ours, data) + 1e-9


def _objective(weight, approx, data) -> float:
    """||(W - Ŵ) data||² (a row or a matrix)."""
    return float(((weight.double() - approx) @ data).pow(2).sum())


@pytest.mark.parametrize("block_columns", [8, 16, 1024])
def test_lazy_blocks_and_mid_pass_groups_match_the_least_squares_reference(block_columns):
    """3 x 32, groups of 8 whose grids are set from already-updated weights, across several lazy blocks."""
    config = QuantConfig("int3", 8)
    x = _correlated_inputs(32, 256, 7)
    weight = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    hessian, data = _damped_data(x)
    ours = gptq_quantize(weight, hessian, config, block_columns=block_columns).dequantize().double()
    torch.testing.assert_close(ours, _greedy_least_squares(weight, data, config), rtol=0, atol=1e-4)


def test_gptq_output_round_trips_through_the_packed_buffers():
    config = QuantConfig("int3", 32)
    x = _correlated_inputs(96, 512, 3)
    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(3))
    hessian, _ = hessian_accumulate(None, 0, x)
    q = gptq_quantize(weight, hessian, config)
    assert q.bits_per_param == pytest.approx(quantize(weight, config).bits_per_param)
    assert q.codes().max() <= 7
    assert (q.dequantize() - weight).abs().max() < (weight.max() - weight.min()) / 2


@pytest.mark.parametrize("config, match", [
    (QuantConfig("nf4"), "INT formats only"),
    (QuantConfig("int4", 32, block_rows=2), "1 x G groups"),
])
def test_refuses_nf_formats_and_tiles(config, match):
    with pytest.raises(QbaraError, match=match):
        gptq_quantize(torch.randn(8, 64), torch.eye(64), config)


def test_refuses_bad_inputs():
    config = QuantConfig("int4", 32)
    with pytest.raises(QbaraError, match=r"Hessian must be \(64, 64\)"):
        gptq_quantize(torch.randn(8, 64), torch.eye(32), config)
    with pytest.raises(QbaraError, match="block_size 32 does not divide"):
        gptq_quantize(torch.randn(8, 48), torch.eye(48), config)
    bad = torch.eye(64)
    bad[0, 0] = float("nan")
    with pytest.raises(QbaraError, match="NaN"):
        gptq_quantize(torch.randn(8, 64), bad, config)
    with pytest.raises(QbaraError, match="damp"):
        gptq_quantize(torch.randn(8, 64), torch.eye(64), config, damp=0.0)
    indefinite = -torch.eye(64)
    with pytest.raises(QbaraError, match="not positive definite"):
        gptq_quantize(torch.randn(8, 64), indefinite, config)
