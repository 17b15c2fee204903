"""The alternation's two starts: "svd" (Q = 0 first: LQ-LoRA's loop) and "quantize" (L1 L2 = 0 first, so
Q = quantize(W) first), run by `decompose` and the error tables, the better run kept."""
import importlib

import pytest
import torch

from qbara.errors import QbaraError
from qbara.lq.decompose import decompose, fisher_scalings, low_rank_factors, quantize_step, weighted_error
from qbara.lq.tables import error_table, matrix_costs
from qbara.quant import QuantConfig, quantize

dec = importlib.import_module("qbara.lq.decompose")
tables = importlib.import_module("qbara.lq.tables")

INT4 = QuantConfig("int4", 32)


def _on_grid(shape=(48, 256), seed=0, config=INT4):
    """A matrix whose every row block already lies on `config`'s grid (a dequantized checkpoint)."""
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return quantize(W0, config).dequantize(torch.float32)


def _student_t(shape, seed, df=3.0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.distributions.StudentT(df).sample(shape)


def _fisher(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) ** 2 + 0.01


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "fisher"])
@pytest.mark.parametrize("config", [INT4, QuantConfig("gguf:q4_1")], ids=lambda c: c.label)
def test_quantize_start_finds_weights_already_on_the_grid(config, weighted):
    W = _on_grid()
    F = _fisher(W.shape) if weighted else None
    scale = weighted_error(W, F)
    svd = decompose(W, config, rank=4, max_iters=30, fisher=F, starts=("svd",))
    both = decompose(W, config, rank=4, max_iters=30, fisher=F)
    # The svd start never gets near Q = W (the test exercises the new start) ...
    assert svd.error > 1e-2 * scale
    # ... while the quantize start's first iterate is exact.
    assert both.error <= 1e-6 * scale
    assert both.start == "quantize" and both.errors == both.start_errors["quantize"]
    assert both.start_errors["svd"] == svd.errors  # the svd run inside is the svd-only one
    assert both.error == both.errors[both.best_iter] == min(min(h) for h in both.start_errors.values())
    # The held iterate is the one reported: Q + L1 L2 reconstructs W.
    assert weighted_error(W - both.reconstruct(), F) <= 1e-6 * scale
    assert both.L1.shape == (48, 4) and both.L2.shape == (4, 256)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "fisher"])
def test_best_of_both_starts_is_the_better_single_start(seed, weighted):
    """Each start draws its own random test matrices: a two-start decomposition is exactly the better of
    the two single-start ones (never worse than either), with both histories recorded."""
    g = torch.Generator().manual_seed(seed)
    mats = {"gauss": torch.randn(32, 128, generator=g) * 0.02,
            "lowrank": (torch.randn(32, 3, generator=g) @ torch.randn(3, 128, generator=g)) * 0.05
            + 0.01 * torch.randn(32, 128, generator=g),
            "heavy": _student_t((32, 128), seed, 2.5) * 0.01}
    winners = set()
    for name, W in mats.items():
        F = _fisher(W.shape, seed + 10) if weighted else None
        for config in (QuantConfig("nf3", 64), QuantConfig("nf2", 32), INT4, QuantConfig("gguf:q4_0")):
            kw = dict(rank=4, max_iters=12, fisher=F, seed=seed)
            svd = decompose(W, config, starts=("svd",), **kw)
            qnt = decompose(W, config, starts="quantize", **kw)
            both = decompose(W, config, **kw)
            assert both.error <= svd.error and both.error <= qnt.error, (name, config.label)
            assert both.error == min(svd.error, qnt.error)
            assert both.start_errors == {"svd": svd.errors, "quantize": qnt.errors}
            winner = svd if svd.error <= qnt.error else qnt
            assert both.start == winner.start and both.best_iter == winner.best_iter
            assert torch.equal(both.L1, winner.L1) and torch.equal(both.L2, winner.L2)
            assert torch.equal(both.qtensor.dequantize(), winner.qtensor.dequantize())
            assert weighted_error(W - both.reconstruct(), F) == pytest.approx(both.error, rel=1e-4)
            winners.add(both.start)
    assert winners == {"svd", "quantize"}  # both starts win somewhere: neither is dead weight


def test_quantize_start_begins_with_plain_quantization():
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    config = QuantConfig("nf3", 64)
    d = decompose(W, config, rank=4, max_iters=10, starts=("quantize",))
    plain = float((W - quantize(W, config).dequantize()).norm())
    assert d.start == "quantize" and d.errors[0] == pytest.approx(plain, rel=1e-6)
    assert d.error < 0.9 * plain  # and the alternation goes on from there


def test_rank_zero_runs_one_start_and_starts_are_checked():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    d = decompose(W, QuantConfig("nf4", 64), rank=0)
    assert list(d.start_errors) == ["svd"] and d.iterations == 1
    for bad in [(), ("svd", "svd"), ("random",), None]:
        with pytest.raises(QbaraError, match="starts"):
            decompose(W, QuantConfig("nf4", 64), rank=2, starts=bad)
    with pytest.raises(QbaraError, match="starts"):
        error_table({"w": W}, [QuantConfig("nf4", 64)], rank=2, starts=("svd", "lucky"), cache=False,
                    progress=False)


# --------------------------------------------------------------------------------------------------
# starts=("svd",) is the alternation as it was before there were starts


def _previous_alternate(W, quantize_step, rank, max_iters, fisher, oversample, power_iters, generator,
                        tol=0.0, warm_start=False, first_factors=None, first_basis=None):
    """A copy of `_alternate` before the quantize start (one run from Q = 0, best iterate kept)."""
    scalings = fisher_scalings(fisher) if fisher is not None else None
    sqrt_f = fisher.clamp_min(0).sqrt() if fisher is not None else None
    errors, best, basis, Q = [], None, first_basis, None
    for it in range(max_iters):
        if it == 0 and first_factors is not None:
            L1, L2 = first_factors
        else:
            X = W if Q is None else W - Q
            L1, L2, new_basis = low_rank_factors(X, rank, scalings, oversample, power_iters, generator,
                                                 init=basis if (warm_start and it > 0) else None)
            basis = new_basis
        R = W - L1 @ L2 if rank > 0 else W
        Q, payload = quantize_step(R)
        err = weighted_error(R - Q, sqrt_fisher=sqrt_f)
        errors.append(err)
        if best is None or err < errors[best[3]]:
            best = (payload, L1, L2, it, R)
        if rank == 0 or err == 0.0:
            break
        if it > 0 and err >= errors[it - 1] * (1.0 - tol):
            break
    return best, errors


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "fisher"])
@pytest.mark.parametrize("config", [QuantConfig("nf3", 64), INT4, QuantConfig("gguf:q4_k")], ids=lambda c: c.label)
def test_svd_start_alone_is_the_previous_decomposition_bit_for_bit(config, weighted):
    g = torch.Generator().manual_seed(4)
    W = _student_t((40, 256), 4) * 0.01 + torch.randn(40, 256, generator=g) * 0.01
    F = _fisher(W.shape) if weighted else None
    d = decompose(W, config, rank=6, max_iters=25, fisher=F, seed=9, starts=("svd",))
    (_, L1, L2, it, R), errors = _previous_alternate(W, quantize_step(config), 6, 25, F, 10, 2,
                                                     torch.Generator().manual_seed(9))
    assert d.errors == errors and d.best_iter == it and d.start == "svd"
    assert torch.equal(d.L1, L1) and torch.equal(d.L2, L2)
    assert torch.equal(d.qtensor.dequantize(), quantize(R, config).dequantize())


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "fisher"])
@pytest.mark.parametrize("dq_mode", ["shared", "loop"])
def test_svd_start_alone_is_the_previous_table_bit_for_bit(dq_mode, weighted, monkeypatch):
    """The table's fast path (first SVD shared, warm starts with table_power_iters) with starts=("svd",) gives
    the same costs as with the previous loop swapped in."""
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(5)) * 0.02
    F = _fisher(W.shape) if weighted else None
    configs = [QuantConfig("nf2", 32), QuantConfig("nf3", 64, dq_bits=4, dq_block_size=16),
               QuantConfig("nf4", 64, double_quant=False), INT4, QuantConfig("gguf:q4_k")]
    kw = dict(rank=4, iters=6, fisher=F, seed=2, dq_mode=dq_mode)
    new = matrix_costs(W, configs, starts=("svd",), **kw)

    def previous(W, step, rank, max_iters, fisher, oversample, power_iters, generator, *, starts, cold_power_iters,
                 **rest):
        assert starts == ("svd",) and rest.pop("patience") == 1  # the shared and loop modes stop at the first bump
        assert rest.pop("stall") is None  # and have no stall rule
        (payload, L1, L2, it, R), errors = _previous_alternate(W, step, rank, max_iters, fisher, oversample,
                                                               power_iters, generator, **rest)
        return dec._LoopResult(payload, L1, L2, errors, it, R)

    monkeypatch.setattr(tables, "_alternate", lambda W, step, **kw: previous(W, step, **kw))
    old = matrix_costs(W, configs, starts=("svd",), **kw)
    assert torch.equal(new, old)
    monkeypatch.undo()
    both = matrix_costs(W, configs, **kw)
    assert (both <= new).all()  # the best of two starts never costs more


# --------------------------------------------------------------------------------------------------
# Error tables


def test_table_costs_weights_on_the_grid_near_zero_and_caches_per_starts(tmp_path):
    weights = {"a": _on_grid((32, 256), 0), "b": _on_grid((48, 256), 1)}
    configs = [QuantConfig("nf4", 64), INT4, QuantConfig("gguf:q4_1"), QuantConfig("gguf:q4_k")]
    kw = dict(rank=4, iters=4, cache_dir=tmp_path, progress=False)
    svd = error_table(weights, configs, starts=("svd",), **kw)
    both = error_table(weights, configs, **kw)
    assert not both.from_cache and both.path != svd.path  # the starts are part of the cache key
    assert svd.settings["starts"] == ["svd"] and both.settings["starts"] == ["svd", "quantize"]
    norms = torch.tensor([float(w.norm()) ** 2 for w in weights.values()], dtype=torch.float64)
    for j in (1, 2):  # INT4 G32 and Q4_1 hold these weights exactly
        assert (both.costs[:, j] <= 1e-12 * norms).all()
        assert (svd.costs[:, j] > 1e-4 * norms).all()
    assert (both.costs <= svd.costs).all()
    # It changes what the ILP picks: at 5 bits the exact 5-bit formats, not Q4_K (whose svd-start costs are lower).
    assert set(both.allocate(5.0).indices) <= {1, 2} and both.allocate(5.0).error <= 1e-12 * float(norms.sum())
    assert both.allocate(5.0).indices != svd.allocate(5.0).indices
    again = error_table(weights, configs, **kw)
    assert again.from_cache and torch.equal(again.costs, both.costs)
    threads = error_table(weights, configs, cache=False, workers=2, rank=4, iters=4, progress=False)
    assert torch.equal(threads.costs, both.costs)  # seeded per matrix: the same on worker threads
