"""llama.cpp's i-quants (gguf:iq4_nl, gguf:iq4_xs, gguf:iq3_s, gguf:iq3_xxs): bytes equal libggml's ggml_quantize_chunk with
and without an importance, the codebook searches' own properties. (Dequantization equal to gguf-py's, on random
bytes and on quantizer output, and the shared fixtures are in test_ggml_formats.py / test_ggml_importance.py,
parametrized over every GGML format.)"""
import hashlib

import numpy as np
import pytest
import torch

from qbara.quant.ggml import GGML_FORMATS, dequantize_ggml, quantize_ggml
from qbara.quant.ggml.iq3 import IQ3S, _tables
from qbara.quant.ggml.iquants import LEVELS, _best_index
from tests.quant.test_ggml_formats import _reference_input
from tests.quant.test_ggml_importance import _heavy_tailed, _reference_importance, _spread_importance

IQUANTS = ["iq4_nl", "iq4_xs", "iq3_s", "iq3_xxs"]


def _gaussian():
    return torch.randn(12, 768, generator=torch.Generator().manual_seed(5)) * 0.03


def _per_row_spread():
    return _spread_importance((12, 768), seed=6)


def _zero_blocks():
    """Gaussian rows with all-zero blocks of 32 inside non-zero super-blocks (IQ3_S then packs the others up)."""
    w = _gaussian().view(12, 24, 32)
    for r in range(12):
        w[r, [r % 24, (5 * r + 7) % 24]] = 0
    return w.view(12, 768)


def _sparse():
    """4% non-zero Gaussian weights: blocks of 32 with one or two of them."""
    g = torch.Generator().manual_seed(9)
    return torch.randn(12, 768, generator=g) * 0.03 * (torch.rand(12, 768, generator=g) < 0.04)


def _very_spread():
    """exp(4 randn) importance: with _sparse(), an IQ3_S block whose refit scale is so small that ggml's
    nearest_int wraps (|value| >= 2^22)."""
    return _spread_importance(768, seed=0) ** 2


# name -> (weight, importance or None); bench/ggml_iquant_fixtures.py hashes libggml's bytes for each.
CASES = {
    "gaussian": (_gaussian, None),
    "gaussian-imatrix": (_gaussian, lambda: _spread_importance(768, seed=7)),
    "gaussian-per-row": (_gaussian, _per_row_spread),
    "heavy": (_heavy_tailed, None),
    "heavy-imatrix": (_heavy_tailed, lambda: _spread_importance(1024)),
    "zero-blocks": (_zero_blocks, None),
    "zero-blocks-imatrix": (_zero_blocks, lambda: _spread_importance(768, seed=8)),
    "sparse-imatrix": (_sparse, _very_spread),
}

# The K-quants' fixture inputs: their hashes are in REFERENCE_SHA256 / IMATRIX_SHA256 / PER_ROW_SHA256 of
# tests/quant/test_ggml_formats.py and test_ggml_importance.py, next to the other formats'.
SHARED_CASES = {
    "reference": (_reference_input, None),
    "reference-imatrix": (_reference_input, lambda: _reference_importance(1024)),
    "reference-per-row": (_reference_input,
                          lambda: torch.stack([_reference_importance(1024).roll(37 * r) for r in range(32)])),
}

# sha256 of ggml_quantize_chunk's bytes (libggml-base.so of llama-cpp-python 0.3.36, through ctypes) for each
# case, printed by `PYTHONPATH=src python3 bench/ggml_iquant_fixtures.py`.
LIBGGML_SHA256 = {
    "iq4_nl-gaussian": "5d192914e516821d159a9bc43265b92350304b956b34a86ac2bf74a55c8bb6c4",
    "iq4_xs-gaussian": "fed6bcfc7e4ebe5b37bcac8cd8b0ddc907312628f86a176855fa15ff2131f900",
    "iq4_nl-gaussian-imatrix": "7862878e73a5cbcfbbd4e190bb14a770f2cbfa1e77544683f2e84bee1254b82f",
    "iq4_xs-gaussian-imatrix": "cbf2ba134e49e7ac2bfa994c1ab022c590b4761f3a923f281b1374503d312739",
    "iq4_nl-gaussian-per-row": "e22e0da9f0d48899e1035e7a01cf5babdf0f6bbe1f1f2fd3e168451fc0e8b4a9",
    "iq4_xs-gaussian-per-row": "db28b7793dd0a0834101793172da354bc92a3d055a10810069f6feea62f603d1",
    "iq4_nl-heavy": "0dcae733339bac768b69f68e040d038ffb409c5849d36b33b93a5ac63c389eb4",
    "iq4_xs-heavy": "b934522704004c73d988b7a0b3779635d99cac9e73861a55e555717ef16f28e3",
    "iq4_nl-heavy-imatrix": "40e7d8b67834d873f19d739d2bf327b2003c50e4c195b0e27065c03dd1fe5de5",
    "iq4_xs-heavy-imatrix": "b804fbb3bbf76a719c64f632a70d21564651d972e952228d176bd1327ee2ab14",
    "iq3_s-gaussian": "4968d1cc4263f046475ec25128d3ffdad0bee84c508e03c7aef30715b42e4d1a",
    "iq3_s-gaussian-imatrix": "a5b3fdfa88b523809380f485394f8549be243034aa1db2d510a3549c852d1517",
    "iq3_s-gaussian-per-row": "02ad64f3f2978f2976149bac3519c7a01bb716e778d0387f38cf9cb93ff13ece",
    "iq3_s-heavy": "dfb3615bc9a1150f5dfebf479fa391a30ee2fc34e3b887001e1460f3d039cd49",
    "iq3_s-heavy-imatrix": "629296e91ead444e1faaea991377a544259b3ce2b0632f3587bace02d98a1b3b",
    "iq4_nl-zero-blocks": "c7a9ea85263a9b81d0a7659a6281a94dde4473a9bef2161bf217f470d5ae7f55",
    "iq4_xs-zero-blocks": "489f5d4e72ac125ab025cfc005a73c8e78eff3dfda0ef10849a6d45471f99046",
    "iq3_s-zero-blocks": "9ec619a47895af6284043d6e0e56211fbb3860a5f0475e6128b9156d3be9f7b0",
    "iq4_nl-zero-blocks-imatrix": "2527e88cc5ac9caf12081dd904dd2bbe2475b5dc7249afbfd99241b064980acf",
    "iq4_xs-zero-blocks-imatrix": "6995c31370d4a22621db6566a6ca455080549fc21e42660b9f1f71144c652e8b",
    "iq3_s-zero-blocks-imatrix": "dd045b14abe030520521fbd2fb6f6e1c16cb6dd78c821276beac97cf06637155",
    "iq4_nl-sparse-imatrix": "161a0467b46af64d12b509777385cb97816906cbaac8cf584dc4007827daaa3a",
    "iq4_xs-sparse-imatrix": "eff9081e6c2e959a988e86e2c51f3e571d60e929bf018d43c59ca0a35a389c43",
    "iq3_s-sparse-imatrix": "ceb327cd8fbe9275e0db740ec6ececbd6e53827c8c8336e42198641089b20710",
    "iq3_xxs-gaussian": "0cf4570987423aaf912fc70027e9287f32d21335deaf235468b13b9a1cd9c40b",
    "iq3_xxs-gaussian-imatrix": "e49c2d1d849cd13b0700f6db95ee7ba3ed0be50156610e83a3849521a9f9dea3",
    "iq3_xxs-gaussian-per-row": "0e9576bab448a852fdef25bd70e0adadf7e5af0c136587778d9384b52970a3fa",
    "iq3_xxs-heavy": "293fa04db838c120e931052e50b7a819392b948079f477767844be2d2c980f5d",
    "iq3_xxs-heavy-imatrix": "53f7b29e753d63e9c827f1c488cf5080b8b8feff0aad29a5e993692177095112",
    "iq3_xxs-zero-blocks": "1d003e9f29515372884960c68baecfbbf98dd56f5f6119c6c362ac81730a8843",
    "iq3_xxs-zero-blocks-imatrix": "fc3dfe9c376f2dbff3e98b83a2fe0a5d8995cfaf00a9b7cc4e925a6143d7e299",
    "iq3_xxs-sparse-imatrix": "df2a263d10d230ab752897c24f492ca04428c365d284e142dbfacd984f4302a5",
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", IQUANTS)
def test_bytes_equal_libggml_quantize_chunk(name, case):
    weight, importance = CASES[case]
    raw = quantize_ggml(weight(), name, importance=None if importance is None else importance())
    assert hashlib.sha256(raw.numpy().tobytes()).hexdigest() == LIBGGML_SHA256[f"{name}-{case}"]


def test_best_index_is_the_nearest_level_ties_going_up():
    """ggml's best_index_int8: the nearest of the 16 levels; exactly half-way between two, the upper one;
    beyond either end, the end. Checked against a brute-force search over every level."""
    levels = np.array(LEVELS, dtype=np.float64)
    mids = (levels[:-1] + levels[1:]) / 2
    v = np.concatenate([mids, mids - 0.25, mids + 0.25, levels, [-500.0, -127.5, 113.5, 1e6],
                        np.random.default_rng(0).uniform(-140, 130, 2000)]).astype(np.float32)
    dist = np.abs(v[:, None].astype(np.float64) - levels[None, :])
    nearest = dist.argmin(1)
    # a tie: argmin keeps the lower index; ggml takes the upper one
    tie = (dist.min(1, keepdims=True) == dist).sum(1) > 1
    want = np.where(tie, nearest + 1, nearest)
    assert np.array_equal(_best_index(torch.from_numpy(v)).numpy(), want)
    # C's comparisons are all false for NaN: its binary search ends at the top level
    odd = torch.tensor([float("nan"), float("inf"), -float("inf")])
    assert _best_index(odd).tolist() == [15, 15, 0]


@pytest.mark.parametrize("name,rival", [("iq4_nl", "q4_0"), ("iq4_xs", "q4_0")])
def test_codebook_errs_less_than_the_uniform_grid_at_no_more_bits(name, rival):
    """The non-linear levels fit Gaussian weights better than Q4_0's uniform grid, at 4.5 and 4.25 bits against
    its 4.5 (the reason llama.cpp offers them; Q4_K, with mins and 6-bit sub-block scales, still errs less)."""
    w = _gaussian()
    assert GGML_FORMATS[name].bits_per_param <= GGML_FORMATS[rival].bits_per_param

    def error(fmt):
        return ((dequantize_ggml(quantize_ggml(w, fmt), w.shape, fmt) - w) ** 2).mean().item()

    assert error(name) < error(rival)


@pytest.mark.parametrize("name", ["iq4_nl", "iq4_xs", "iq3_xxs"])
def test_zero_and_tiny_blocks_store_scale_zero(name):
    """A block whose absmax is below GROUP_MAX_EPS (1e-15; IQ3_XXS: 1e-8) gets scale 0 and dequantizes to zeros."""
    w = _gaussian()[:, :256].clone()
    w[0] = 0
    w[1] = 1e-16
    raw = quantize_ggml(w, name)
    back = dequantize_ggml(raw, w.shape, name)
    assert torch.equal(back[:2], torch.zeros(2, 256)) and (back[2:] != 0).any()


def test_iq3_s_all_zero_block_moves_the_later_blocks_up():
    """ggml writes no grid indices or signs for an all-zero block of 32 and does not advance past it: the later
    blocks' bytes move up one slot and the last slot stays zero, while their high bits and scales stay in place.
    Without an importance each block's search is its own, so the super-block with block 2 small (the same max
    scale) holds the same bytes for the others, unshifted."""
    w = _gaussian()[:1, :256].clone()
    w[0, 64:96] = 1e-3 * torch.arange(32) / 32
    full = quantize_ggml(w, "iq3_s")[0]
    w[0, 64:96] = 0
    raw = quantize_ggml(w, "iq3_s")[0]
    qs, qh, signs = (slice(2, 66), slice(66, 74), slice(74, 106))
    per_block = {"qs": (full[qs].view(8, 8), raw[qs].view(8, 8)), "signs": (full[signs].view(8, 4),
                                                                             raw[signs].view(8, 4))}
    for before, after in per_block.values():
        assert torch.equal(after[:2], before[:2]) and torch.equal(after[2:7], before[3:])
        assert not after[7].any()
    assert raw[qh][2] == 0 and torch.equal(raw[qh][[0, 1, 3, 4, 5, 6, 7]], full[qh][[0, 1, 3, 4, 5, 6, 7]])
    assert torch.equal(raw[:2], full[:2]) and torch.equal(raw[106:], full[106:])  # block 2's scale: 0 either way


def test_iq3_s_neighbours_are_the_grid_points_at_the_three_nearest_distances():
    """The search's neighbour lists (ggml's iq3xs_init_impl), checked by brute force on a sample of off-grid
    points: every grid point whose squared distance is one of the three smallest, by distance then index."""
    grid, kmap, neighbours, _ = _tables(IQ3S)
    points = [[2 * ((u >> 3 * k) & 7) + 1 for k in range(4)] for u in range(4096)]
    grid_points = grid.astype(int).tolist()
    assert sorted(kmap[kmap >= 0].tolist()) == list(range(512)) and (kmap >= 0).sum() == 512
    off = [u for u in range(4096) if kmap[u] < 0]
    for u in off[::37]:
        dist = [sum((a - b) ** 2 for a, b in zip(points[u], p)) for p in grid_points]
        nearest = sorted(set(dist))[:3]
        want = sorted((d, j) for j, d in enumerate(dist) if d in nearest)
        got = [j for j in neighbours[u].tolist() if j >= 0]
        assert got == [j for _, j in want]
