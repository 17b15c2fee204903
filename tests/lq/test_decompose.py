import importlib

import pytest
import torch

from qbara.errors import QbaraError
from qbara.lq.decompose import decompose, fisher_scalings, low_rank_factors, randomized_svd
from qbara.quant import QuantConfig, quantize

dec = importlib.import_module("qbara.lq.decompose")  # the module (the package exports the function)


def _matrices():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(64, 128, generator=g) * 0.02
    low = (torch.randn(96, 6, generator=g) @ torch.randn(6, 64, generator=g)) * 0.05 \
        + 0.01 * torch.randn(96, 64, generator=g)
    heavy = torch.distributions.StudentT(3.0).sample((32, 192)) * 0.01
    outliers = torch.randn(48, 64, generator=g) * 0.02
    outliers[3, :] *= 20  # one large row: a rank-1 structure plain quantization handles badly
    return {"gauss": gauss, "lowrank+noise": low, "student-t": heavy, "outlier-row": outliers}


CONFIGS = [QuantConfig("nf2", 64), QuantConfig("nf3", 32, dq_bits=4, dq_block_size=16),
           QuantConfig("nf4", 64), QuantConfig("nf8", 16, dq_bits=2, dq_dtype="bf16", dq_block_size=64)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_decomposition_never_worse_than_plain_quantization(config):
    for name, W in _matrices().items():
        plain = float((W - quantize(W, config).dequantize()).norm())
        d = decompose(W, config, rank=8, max_iters=20)
        assert d.error <= plain * (1 + 1e-6), (name, d.error, plain)
        # The reported error is that of the returned factors.
        assert float((W - d.reconstruct()).norm()) == pytest.approx(d.error, rel=1e-4)
        assert d.L1.shape == (W.shape[0], 8) and d.L2.shape == (8, W.shape[1])
        assert d.L1.dtype == d.L2.dtype == torch.float32


def test_rank_zero_is_plain_quantization():
    W = _matrices()["gauss"]
    cfg = QuantConfig("nf3", 64)
    d = decompose(W, cfg, rank=0)
    assert d.L1.shape == (64, 0) and d.L2.shape == (0, 128)
    assert d.iterations == 1 and d.best_iter == 0
    assert torch.equal(d.qtensor.dequantize(), quantize(W, cfg).dequantize())
    assert d.error == pytest.approx(float((W - quantize(W, cfg).dequantize()).norm()), rel=1e-6)


def _bump_the_4th_quantization(monkeypatch, scale: float) -> None:
    """Make the loop's 4th quantization see its residual plus Gaussian noise of `scale`: that iterate's error jumps."""
    calls = {"n": 0}
    real_nf_step = dec._nf_step

    def noisy_nf_step(config):
        step = real_nf_step(config)

        def noisy(R):
            calls["n"] += 1
            if calls["n"] == 4:
                R = R + scale * torch.randn(R.shape, generator=torch.Generator().manual_seed(1))
            return step(R)

        return noisy

    monkeypatch.setattr(dec, "_nf_step", noisy_nf_step)


def test_best_iterate_is_returned_when_the_error_rises(monkeypatch):
    """Perturb the 4th quantization so that iteration's error jumps: the loop must stop there and return
    the iterate before it, not the last one."""
    W = _matrices()["lowrank+noise"]
    cfg = QuantConfig("nf3", 64)
    _bump_the_4th_quantization(monkeypatch, 0.05)
    d = decompose(W, cfg, rank=4, max_iters=50, starts=("svd",))  # one run: the 4th call is its 4th iteration
    assert len(d.errors) == 4  # stopped at the first increase
    assert d.errors[3] > d.errors[2]
    assert d.best_iter == 2 and d.error == min(d.errors)
    assert float((W - d.reconstruct()).norm()) == pytest.approx(min(d.errors), rel=1e-4)
    assert float((W - d.reconstruct()).norm()) < d.errors[-1]


def test_patience_continues_past_a_bump_to_a_better_iterate(monkeypatch):
    """A perturbed 4th quantization (smaller than above): with patience 3 the run goes on past the bump and
    returns a later iterate better than any before it, where patience 1 stops at the bump."""
    W = _matrices()["lowrank+noise"]
    cfg = QuantConfig("nf3", 64)
    _bump_the_4th_quantization(monkeypatch, 0.01)
    d = decompose(W, cfg, rank=4, max_iters=50, starts=("svd",), patience=3)
    assert d.errors[3] > d.errors[2]  # the bump
    assert len(d.errors) > 4 and d.best_iter > 3 and d.error < d.errors[2]
    assert float((W - d.reconstruct()).norm()) == pytest.approx(d.error, rel=1e-4)
    with pytest.raises(QbaraError, match="patience must be a positive integer"):
        decompose(W, cfg, rank=4, patience=0)


def test_best_iterate_natural_stop():
    # Without perturbation: whatever the history, the returned iterate is the minimum of it.
    for W in _matrices().values():
        d = decompose(W, QuantConfig("nf2", 32), rank=4, max_iters=100)
        assert d.error == min(d.errors)
        assert d.errors.index(min(d.errors)) == d.best_iter
        assert float((W - d.reconstruct()).norm()) == pytest.approx(d.error, rel=1e-4)
        if d.iterations < 100:  # stopped early: on an iterate that did not improve
            assert d.errors[-1] >= d.errors[-2]


@pytest.mark.parametrize("config", [QuantConfig("nf3", 32, dq_bits=3, dq_dtype="bf16", dq_block_size=16),
                                    QuantConfig("nf4", 64, double_quant=False), QuantConfig("int4", 32)],
                         ids=lambda c: c.label)
def test_fast_quantization_step_matches_qbara_quantize(config):
    """decompose's loop uses a faster NF path; the same loop with qbara.quant.quantize gives the same history
    and the packed Q is exactly quantize() of the best iterate's residual."""
    W = _matrices()["lowrank+noise"]
    d = decompose(W, config, rank=4, max_iters=8, seed=5)

    def reference_step(R):
        return quantize(R, config).dequantize(), None

    ref = dec._alternate(W, reference_step, 4, 8, None, 10, 2, torch.Generator().manual_seed(5))
    assert d.errors == pytest.approx(ref.errors, rel=1e-6) and d.best_iter == ref.best_iter
    assert torch.equal(d.qtensor.dequantize(), quantize(ref.residual, config).dequantize())


def test_decompose_is_seeded_and_deterministic():
    W = _matrices()["gauss"]
    a = decompose(W, QuantConfig("nf3", 64), rank=8, max_iters=6, seed=3)
    b = decompose(W, QuantConfig("nf3", 64), rank=8, max_iters=6, seed=3)
    assert a.errors == b.errors and torch.equal(a.L1, b.L1)


def test_randomized_svd_recovers_top_singular_values():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 8, generator=g) @ torch.diag(torch.linspace(10, 3, 8)) @ torch.randn(8, 150, generator=g)
    X = X + 1e-3 * torch.randn(200, 150, generator=g)
    U, S, Vh = randomized_svd(X, 5, oversample=10, power_iters=2, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.svdvals(X)[:5]
    assert torch.allclose(S, exact, rtol=1e-4)
    assert torch.allclose(U.T @ U, torch.eye(5), atol=1e-4)
    assert torch.allclose(Vh @ Vh.T, torch.eye(5), atol=1e-4)
    best = torch.linalg.svd(X, full_matrices=False)
    err_exact = float((X - best.U[:, :5] * best.S[:5] @ best.Vh[:5]).norm())
    assert float((X - U * S @ Vh).norm()) <= err_exact * (1 + 1e-3)


def _weighted(F, X, L1, L2):
    return float((F * (X - L1 @ L2) ** 2).sum())


def _als(F, X, r, iters=150, seed=0):
    """Alternating weighted least squares for min ||sqrt(F) * (X - A B)||² (a local optimum)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(X.shape[0], r, generator=g, dtype=torch.float64)
    B = torch.randn(r, X.shape[1], generator=g, dtype=torch.float64)
    for _ in range(iters):
        for j in range(X.shape[1]):  # column j of B: weighted LS with weights F[:, j]
            w = F[:, j]
            B[:, j] = torch.linalg.solve(A.T @ (w[:, None] * A) + 1e-12 * torch.eye(r, dtype=A.dtype),
                                         A.T @ (w * X[:, j]))
        for i in range(X.shape[0]):
            w = F[i, :]
            A[i, :] = torch.linalg.solve((B * w) @ B.T + 1e-12 * torch.eye(r, dtype=A.dtype), (B * w) @ X[i, :])
    return A, B


def test_fisher_weighted_svd_is_the_weighted_least_squares_optimum_for_separable_weights():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 10, generator=g, dtype=torch.float64)
    a = torch.rand(12, generator=g, dtype=torch.float64) * 5 + 0.1
    b = torch.rand(10, generator=g, dtype=torch.float64) * 5 + 0.1
    F = a[:, None] * b[None, :]  # rank-1 (separable) Fisher weights
    r = 3
    L1, L2, _ = low_rank_factors(X, r, fisher_scalings(F), oversample=10)  # exact SVD at this size
    ours = _weighted(F, X, L1, L2)
    # Independent check: alternating weighted least squares from several starts never does better.
    for seed in range(3):
        A, B = _als(F, X, r, seed=seed)
        assert ours <= _weighted(F, X, A, B) * (1 + 1e-9)
    assert ours == pytest.approx(_weighted(F, X, *_als(F, X, r)), rel=1e-6)
    # Local optimality: random perturbations of the factors never lower the objective.
    for k in range(30):
        pg = torch.Generator().manual_seed(100 + k)
        dA = 1e-4 * torch.randn(L1.shape, generator=pg, dtype=torch.float64)
        dB = 1e-4 * torch.randn(L2.shape, generator=pg, dtype=torch.float64)
        assert _weighted(F, X, L1 + dA, L2 + dB) >= ours - 1e-12
    # And the weighting matters: the unweighted SVD is worse on the weighted objective.
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    assert _weighted(F, X, U[:, :r] * S[:r], Vh[:r]) > ours * 1.01


def test_fisher_scalings_are_root_row_and_column_means():
    F = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    d_row, d_col = fisher_scalings(F)
    assert torch.allclose(d_row, torch.tensor([2.0, 2.0]).sqrt())
    assert torch.allclose(d_col, torch.tensor([0.5, 3.5]).sqrt())
    ones_row, ones_col = fisher_scalings(torch.zeros(3, 4))
    assert torch.equal(ones_row, torch.ones(3)) and torch.equal(ones_col, torch.ones(4))


def test_fisher_weighted_decompose_reports_weighted_error():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g) * 0.02
    F = torch.rand(32, 64, generator=g) ** 2
    d = decompose(W, QuantConfig("nf3", 64), rank=4, max_iters=10, fisher=F)
    weighted = float((F * (W - d.reconstruct()) ** 2).sum().sqrt())
    assert d.error == pytest.approx(weighted, rel=1e-4)
    assert d.error == min(d.errors)


def test_decompose_input_errors():
    W = torch.randn(16, 64)
    with pytest.raises(QbaraError, match="rank"):
        decompose(W, QuantConfig("nf4", 64), rank=17)
    with pytest.raises(QbaraError, match="Fisher"):
        decompose(W, QuantConfig("nf4", 64), rank=2, fisher=torch.ones(16, 32))
    with pytest.raises(QbaraError, match="block_size"):
        decompose(torch.randn(16, 48), QuantConfig("nf4", 64), rank=2)
    with pytest.raises(QbaraError, match="max_iters"):
        decompose(W, QuantConfig("nf4", 64), rank=2, max_iters=0)
