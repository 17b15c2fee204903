"""llama.cpp's 4-bit i-quants (gguf:iq4_nl, gguf:iq4_xs): bytes equal libggml's ggml_quantize_chunk with and
without an importance, the codebook search's own properties. (Dequantization equal to gguf-py's, on random
bytes and on quantizer output, and the shared fixtures are in test_ggml_formats.py / test_ggml_importance.py,
parametrized over every GGML format.)"""
import hashlib

import numpy as np
import pytest
import torch

from qbara.quant.ggml import GGML_FORMATS, dequantize_ggml, quantize_ggml
from qbara.quant.ggml.iquants import LEVELS, _best_index
from tests.quant.test_ggml_formats import _reference_input
from tests.quant.test_ggml_importance import _heavy_tailed, _reference_importance, _spread_importance

IQUANTS = ["iq4_nl", "iq4_xs"]


def _gaussian():
    return torch.randn(12, 768, generator=torch.Generator().manual_seed(5)) * 0.03


def _per_row_spread():
    return _spread_importance((12, 768), seed=6)


# name -> (weight, importance or None); bench/ggml_iquant_fixtures.py hashes libggml's bytes for each.
CASES = {
    "gaussian": (_gaussian, None),
    "gaussian-imatrix": (_gaussian, lambda: _spread_importance(768, seed=7)),
    "gaussian-per-row": (_gaussian, _per_row_spread),
    "heavy": (_heavy_tailed, None),
    "heavy-imatrix": (_heavy_tailed, lambda: _spread_importance(1024)),
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


@pytest.mark.parametrize("name", IQUANTS)
def test_zero_and_tiny_blocks_store_scale_zero(name):
    """A block whose absmax is below GROUP_MAX_EPS (1e-15) gets scale 0 and dequantizes to zeros."""
    w = _gaussian()[:, :256].clone()
    w[0] = 0
    w[1] = 1e-16
    raw = quantize_ggml(w, name)
    back = dequantize_ggml(raw, w.shape, name)
    assert torch.equal(back[:2], torch.zeros(2, 256)) and (back[2:] != 0).any()
