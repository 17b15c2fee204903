"""llama.cpp's 4-bit i-quants (gguf:iq4_nl, gguf:iq4_xs): bytes equal libggml's ggml_quantize_chunk with and
without an importance, dequantization equal to gguf-py's, the codebook search's own properties."""
import hashlib

import pytest
import torch

from qbara.quant.ggml import quantize_ggml
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
