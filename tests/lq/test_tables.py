import copy
import json

import pytest
import torch

import qbara.lq.tables as tables_mod
from qbara.errors import QbaraError
from qbara.lq.configs import candidate_configs
from qbara.lq.parallel import shard
from qbara.lq.tables import ErrorTable, _dq_errors, error_table, matrix_costs
from qbara.quant import QuantConfig, quantize
from qbara.quant.nf import (
    dequantize_nf,
    keep_ratios,
    nf_codes,
    nf_levels,
    nf_midpoints,
    quantize_nf,
    quantize_nf_values,
)
from tests.helpers import free_port
from tests.lq.dist_worker import small_configs, small_weights


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fast_nf_rounding_is_bit_identical(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(48, 256, generator=g) * 0.02
    W[0, :64] = 0.0
    W[1, :15] = nf_midpoints(4)  # absmax 1: values exactly on NF4 rounding boundaries
    W[2, :] = torch.distributions.StudentT(2.0).sample((256,))
    for B in (16, 64):
        codes, absmax = quantize_nf(W, bits, B)
        v, absmax2, deq = quantize_nf_values(W, bits, B)
        assert torch.equal(absmax, absmax2)
        assert torch.equal(nf_levels(bits)[codes.long()].view(-1, B), v)
        assert torch.equal(dequantize_nf(codes, absmax, bits, B).view(W.shape), deq)
    mids = nf_midpoints(bits)
    x = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                   torch.tensor([-1.0, 0.0, 1.0]), torch.rand(20000, generator=g) * 2 - 1])
    assert torch.equal(nf_codes(x, bits), torch.bucketize(x, mids))


@pytest.mark.parametrize("chunk", [None, 3 * 64])
@pytest.mark.parametrize("weighted", [False, True])
def test_double_quant_errors_match_direct_quantization(weighted, chunk, monkeypatch):
    """The table's errors for every double-quant setting equal quantize()'s (codes rounded against the
    stored scales), Fisher-weighted alike, NF8 (direct path) included; in chunks of a few blocks too (the
    work arrays are bounded by chunking, whatever the matrix size)."""
    import qbara.lq.tables as tables

    if chunk is not None:
        monkeypatch.setattr(tables, "DQ_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    R = torch.randn(64, 512, generator=g) * 0.02
    R[0, :64] = 0.0  # a zero block: offset 0, some stored scales 0
    F = torch.rand(R.shape, generator=g) if weighted else None
    settings = [(b0, dt, B1) for b0 in (2, 3, 4, 8) for dt in ("bf16", "fp16", "fp32") for B1 in (16, 64, 256)]
    for bits, B0 in [(2, 16), (3, 64), (4, 32), (8, 64)]:
        v, absmax, _ = quantize_nf_values(R, bits, B0)
        got = _dq_errors(R.reshape(-1, B0), absmax, v, bits, settings, F)
        for b0, dt, B1 in settings:
            cfg = QuantConfig(f"nf{bits}", B0, dq_bits=b0, dq_dtype=dt, dq_block_size=B1)
            sq = (R - quantize(R, cfg).dequantize()) ** 2
            direct = float((sq if F is None else sq * F).sum(dtype=torch.float64))
            assert got[(b0, dt, B1)] == pytest.approx(direct, rel=1e-5), cfg.label


def test_keep_ratios_bound_where_the_nearest_level_changes():
    g = torch.Generator().manual_seed(3)
    t = torch.rand(4000, generator=g) * 2 - 1
    t[:3] = torch.tensor([0.0, 1.0, -1.0])
    for bits in (2, 3, 4):
        lo, hi = keep_ratios(t, bits)
        code = torch.bucketize(t, nf_midpoints(bits))
        for rho in (0.5, 0.9, 0.99, 1.0, 1.01, 1.1, 2.0):
            moved = torch.bucketize((t * rho).clamp(-1, 1), nf_midpoints(bits)) != code
            inside = (lo < rho) & (rho <= hi)
            near_end = torch.minimum((lo - rho).abs(), (hi - rho).abs()) < 1e-5
            assert not (moved & inside & ~near_end).any() and not (~moved & ~inside & ~near_end).any()


def test_rank0_table_is_exactly_plain_quantization_for_all_432_configs():
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    configs = candidate_configs()
    costs = matrix_costs(W, configs, rank=0)
    direct = torch.tensor([float(((W - quantize(W, c).dequantize()) ** 2).sum(dtype=torch.float64))
                           for c in configs], dtype=torch.float64)
    assert torch.allclose(costs, direct, rtol=1e-5, atol=0)


def test_table_costs_with_low_rank_are_below_plain_quantization():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.02
    configs = small_configs() + [QuantConfig("nf3", 64, double_quant=False), QuantConfig("int4", 32)]
    plain = matrix_costs(W, configs, rank=0)
    lq = matrix_costs(W, configs, rank=8, iters=4)
    assert (lq <= plain * (1 + 1e-6)).all()
    assert lq[-2] < plain[-2] * 0.95  # the low-rank part helps
    # A config whose block size does not divide d_in is unusable (+inf), not an error.
    odd = matrix_costs(torch.randn(8, 48), [QuantConfig("nf4", 32), QuantConfig("nf4", 16)], rank=2, iters=2)
    assert odd[0] == float("inf") and torch.isfinite(odd[1])


def test_shared_and_loop_modes_agree_after_one_iteration():
    # With one iteration both quantize W - SVD_r(W): the shared codes are then exact for every setting.
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    configs = small_configs()
    shared = matrix_costs(W, configs, rank=4, iters=1, dq_mode="shared")
    loop = matrix_costs(W, configs, rank=4, iters=1, dq_mode="loop")
    assert torch.allclose(shared, loop, rtol=1e-5)
    several = matrix_costs(W, configs, rank=4, iters=4, dq_mode="loop")
    assert (several <= loop * (1 + 1e-6)).all()


def test_fisher_weighted_table_cost():
    weights = small_weights()
    g = torch.Generator().manual_seed(4)
    fisher = {n: torch.rand(w.shape, generator=g) ** 3 for n, w in weights.items()}
    cfg = [QuantConfig("nf3", 32, dq_bits=4, dq_block_size=16), QuantConfig("nf2", 64)]
    table = error_table(weights, cfg, rank=0, fisher=fisher, cache=False, progress=False)
    for i, n in enumerate(table.names):
        for j, c in enumerate(cfg):
            E = weights[n] - quantize(weights[n], c).dequantize()
            assert float(table.costs[i, j]) == pytest.approx(float((fisher[n] * E * E).sum()), rel=1e-5)
    with pytest.raises(QbaraError, match="lacks"):
        error_table(weights, cfg, rank=0, fisher={}, cache=False, progress=False)


def test_table_cache_hit_is_identical_and_skips_computation(tmp_path, monkeypatch):
    from qbara.models import tiny_llama

    model, _ = tiny_llama()
    configs = small_configs()
    first = error_table(model, configs, rank=4, iters=3, dq_mode="shared", cache_dir=tmp_path, progress=False)
    assert not first.from_cache and first.path is not None and first.path.is_file()
    assert first.path.with_suffix(".json").is_file()
    assert len(first.names) == 14 and first.costs.shape == (14, len(configs))
    assert torch.isfinite(first.costs).all() and (first.costs > 0).all()

    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(tables_mod, "matrix_costs", boom)
    second = error_table(model, configs, rank=4, iters=3, dq_mode="shared", cache_dir=tmp_path, progress=False)
    assert second.from_cache
    assert torch.equal(second.costs, first.costs) and second.costs.dtype == torch.float64
    assert second.names == first.names and second.configs == first.configs and second.shapes == first.shapes
    assert second.allocate(3.0).indices == first.allocate(3.0).indices
    # Other settings are another cache entry: they would recompute.
    with pytest.raises(AssertionError, match="recomputed"):
        error_table(model, configs, rank=2, iters=3, dq_mode="shared", cache_dir=tmp_path, progress=False)
    # Other weights too.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    with pytest.raises(AssertionError, match="recomputed"):
        error_table(other, configs, rank=4, iters=3, dq_mode="shared", cache_dir=tmp_path, progress=False)
    assert ErrorTable.load(first.path).settings == first.settings


def test_allocation_feeds_quantize_model(tmp_path):
    from qbara.models import tiny_llama
    from qbara.models.streaming import quantize_model

    model, _ = tiny_llama()
    table = error_table(model, small_configs(), rank=4, iters=2, cache=False, progress=False)
    low, high = table.budget_range()
    assert low < 3.0 < high
    alloc = table.allocate(3.0)
    assert alloc.bits_per_param <= 3.0 and set(alloc.configs) == set(table.names)
    assert alloc.error == pytest.approx(float(sum(table.costs[i, j] for i, j in enumerate(alloc.indices))))
    tighter = table.allocate(2.7)
    assert tighter.error >= alloc.error
    json.dumps(alloc.to_dict())
    quantize_model(model, alloc.configs)
    assert type(model.get_submodule(table.names[0])).__name__ == "QuantizedLinear"
    with pytest.raises(QbaraError, match="smallest feasible budget"):
        table.allocate(low - 0.2)


def test_shards_cover_every_matrix_once():
    numels = [5, 100, 7, 100, 30, 30, 1]
    shares = shard(numels, 3)
    assert sorted(i for s in shares for i in s) == list(range(7))
    loads = [sum(numels[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= 100


def test_two_gloo_ranks_give_the_single_process_table(tmp_path, monkeypatch):
    """Both ranks resume the rows a single process saved before it was interrupted (one shared cache folder),
    compute the rest of their shares and end with the single-process table."""
    import torch.multiprocessing as mp

    from tests.lq import dist_worker

    weights, real, started = small_weights(), tables_mod.matrix_costs, []

    def interrupted(W, configs, **kwargs):
        started.append(kwargs["name"])
        if len(started) > 3:
            raise KeyboardInterrupt
        return real(W, configs, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(tables_mod, "matrix_costs", interrupted)
        with pytest.raises(KeyboardInterrupt):
            error_table(weights, small_configs(), rank=4, iters=3, dq_mode="shared", cache_dir=tmp_path / "cache",
                        progress=False, workers=1)  # one worker: exactly the first 3 matrices are saved
    saved = set(started[:3])
    mp.spawn(dist_worker.run, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    names, shares = list(weights), shard([w.numel() for w in weights.values()], 2)
    for r, result in enumerate((r0, r1)):  # each rank computed the missing matrices of its share, once
        assert sorted(result["calls"]) == sorted({names[i] for i in shares[r]} - saved)
    assert not list((tmp_path / "cache").glob("*.partial"))
    assert torch.equal(r0["costs"], r1["costs"])  # all-reduced: every rank holds the full table
    assert r0["from_cache"] == [False, True] and r1["from_cache"] == [False, True]
    assert torch.equal(r0["again"], r0["costs"])
    single = error_table(small_weights(), small_configs(), rank=4, iters=3, dq_mode="shared", cache=False,
                         progress=False)
    assert torch.allclose(single.costs, r0["costs"], rtol=1e-5)
    for budget, indices in r0["alloc"].items():
        assert single.allocate(budget).indices == indices == r1["alloc"][budget]
