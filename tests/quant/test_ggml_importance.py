"""Importance-weighted GGML quantization (ggml's quant_weights / imatrix path): bytes libggml writes with an
importance matrix, per-weight importance, the weighted error it lowers, valid blocks, errors, make_qp_quants."""
import hashlib

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from qbara.errors import QbaraError
from qbara.quant import QuantConfig, quantize
from qbara.quant.ggml import GGML_FORMATS, dequantize_ggml, quantize_ggml
from qbara.quant.ggml.searches import make_qp_quants
from tests.quant.test_ggml_formats import _reference_input

WEIGHTED = [name for name in GGML_FORMATS if name != "q8_0"]


def _reference_importance(cols=1024):
    """An importance vector made with exact integer hashing and exact float arithmetic (the same on every
    platform): mantissa in [1, 2) times 2**-13 .. 2**3 (about 1e-4 .. 16, every value exact in float32), and
    exact zeros at every 97th column."""
    j = np.arange(cols, dtype=np.uint64)

    def bits(k):
        h = (j * np.uint64(2654435761) + np.uint64(40503 * k + 1)) % np.uint64(2 ** 32)
        h ^= h >> np.uint64(15)
        h = h * np.uint64(2246822519) % np.uint64(2 ** 32)
        return h ^ (h >> np.uint64(13))

    mantissa = 1.0 + (bits(1) >> np.uint64(9)).astype(np.float64) / 2 ** 23
    exponent = ((bits(2) >> np.uint64(8)) % np.uint64(17)).astype(np.int64) - 13
    imp = np.ldexp(mantissa, exponent)
    imp[j % np.uint64(97) == 13] = 0.0
    return torch.from_numpy(imp.astype(np.float32))


# sha256 of the bytes libggml writes for _reference_input() with _reference_importance(1024) as imatrix:
# ggml_quantize_chunk(type, x, out, 0, 32, 1024, imatrix) called through ctypes on libggml-base.so from
# llama-cpp-python 0.3.36 (quantize_row_*_impl in ggml-quants.c; q8_0 has no imatrix path, so it is
# REFERENCE_SHA256's q8_0). The same library reproduces REFERENCE_SHA256 without an imatrix.
IMATRIX_SHA256 = {
    "q2_k": "529e89a2cffc1c191c6049cae64eda2387efd912c3d7719a8d3f349f0b8e02c9",
    "q3_k": "3e0e2e70fdd0cd2538f646924356e96c52108d8df7a3cf0b06faea285abcde5c",
    "q4_k": "06c70609612f65a77251328afe5c8a23bef62c1cee90cd897b5525f7027773c6",
    "q5_k": "3daa07e08fddc22c620a944ea2199304b16bd9cc106a92431206b88e85547f54",
    "q6_k": "e92334be8c0ea5fe8acb959d8ad3655c1f99ae503d604869d65dd72e80ba737b",
    "q4_0": "92e407b88cf95651da9bc91a8f45826d5975598991cbf8add5b33c299bda97e9",
    "q4_1": "fcaa37680ef82a428a66ac1b24cefa9cc21791439822504849620a1d19b3c42e",
    "q5_0": "392d754002e31f6770c0b15b507c6b4dd1129f9550644e9767de958df85979be",
    "q5_1": "840ecbb1fe13957c5f1720fd36071f61a7486355b51d15208c3478177a94b625",
    "q8_0": "24370b64bfa8b330ba8e5c7bb3d421cd92857458f0afa8226797ef3d4682de43",
    "iq3_s": "9aafd23e6fcfff18a1bb93831f4b7e7b9c1a58aab26df39be1b0fcf2f411e475",
    "iq3_xxs": "38fb72396d18c5b0bad0d3a152b05227bc14000a0b982c706b189647ca420f51",
    "iq4_nl": "64cc1bc407d186b1b86e54490a8aa9fafbb9c3866f6b2c8efb13bd4eecc77d5f",
    "iq4_xs": "b9a3ba6f57dfdcb4fd65e64ff199dd3027ffb964ed8fed9990a4ca04a845faa0",
}

# The same with a different imatrix per row (row r: _reference_importance(1024) rotated by 37 * r), libggml
# called on one row at a time (ggml_quantize_chunk(type, x[r], out[r], 0, 1, 1024, imatrix_r)).
PER_ROW_SHA256 = {
    "q2_k": "436bfa2abf61e5794a6ba17af456a22318c44a524313f6b3749770acdaa30ad0",
    "q3_k": "1f00f3a3f39a15f5589a5fd05dc91ed70d3fb05db372645bd71737b71c4de750",
    "q4_k": "83a525413f52736b8e7e18a8fbb50f6fccc64b12fafedfd793eea24729079eaf",
    "q5_k": "1c19339b5616b4ca90191cd707bea05f9fc850885df80625c97943a6371c1d8e",
    "q6_k": "f360876470c872d81aab99e0f3399283bf59ddf4313d566fd69f8c14cd4ce5ca",
    "q4_0": "222e31cbe5be076073271917a011a73eac5bb6164466b1fd62ab7bb675ee25b1",
    "q4_1": "00cbbef744a80be1a6eaec8ba08e5765f90966789eb99d9c8d8c8accd78ad1b6",
    "q5_0": "9adf4aaae8ad032b2ec0be47dc82f6e2ac32e23e9e877168b7313aebc51e8ef3",
    "q5_1": "599123c0d840dd99640bad829dbf543e5ce5ecd969a115d4b4dbe8bb0f0aa554",
    "q8_0": "24370b64bfa8b330ba8e5c7bb3d421cd92857458f0afa8226797ef3d4682de43",
    "iq3_s": "2719e0ef6ba56c82d6fe15f170d2c31a8527e174cd9e8005e94c205c0e3392c2",
    "iq3_xxs": "7f7b111f156dd99e499fb2377130f555f289b565ee44efb2796e8e01eb7598d8",
    "iq4_nl": "0820d2fa5f3d1b0cfe1a18778c1aecd7c74c36d6ed1ecf15cd2eab9812de0df8",
    "iq4_xs": "d81bd5b9f06c5c066dc154a617c673038c81fdb6c26a8fa5813d8bf89defa261",
}


def _sha256(raw):
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", list(GGML_FORMATS))
def test_bytes_equal_libggml_with_imatrix(name):
    raw = quantize_ggml(_reference_input(), name, importance=_reference_importance(1024))
    assert _sha256(raw) == IMATRIX_SHA256[name]


@pytest.mark.parametrize("name", list(GGML_FORMATS))
def test_bytes_equal_libggml_with_a_different_imatrix_per_row(name):
    """A (d_out, d_in) importance is a per-row imatrix: libggml called one row at a time, each row with its own
    (the columns of _reference_importance rotated by 37 * row)."""
    x = _reference_input()
    imp = torch.stack([_reference_importance(1024).roll(37 * r) for r in range(x.shape[0])])
    assert _sha256(quantize_ggml(x, name, importance=imp)) == PER_ROW_SHA256[name]


def _heavy_tailed(rows=16, cols=1024, seed=0):
    """Gaussian times rand**-0.5: a heavy tail (a few weights 10-100x the typical one)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.01 * torch.rand(rows, cols, generator=g).pow(-0.5)


def _spread_importance(shape, seed=1):
    """exp(2 * randn): weights spread over several orders of magnitude."""
    return torch.exp(2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("name", list(GGML_FORMATS))
def test_per_weight_importance_equal_on_every_row_is_the_vector(name):
    w = _heavy_tailed()
    imp = _spread_importance(1024)
    assert torch.equal(quantize_ggml(w, name, importance=imp.expand(16, 1024).contiguous()),
                       quantize_ggml(w, name, importance=imp))


@pytest.mark.parametrize("name", list(GGML_FORMATS))
def test_importance_scaled_by_a_power_of_two_gives_the_same_bytes(name):
    """The searches only compare weighted sums, so scaling every weight by 4 (exact in float32) changes nothing."""
    w = _heavy_tailed()
    imp = _spread_importance(1024)
    assert torch.equal(quantize_ggml(w, name, importance=4.0 * imp), quantize_ggml(w, name, importance=imp))
    per_weight = _spread_importance((16, 1024), seed=2)
    assert torch.equal(quantize_ggml(w, name, importance=0.25 * per_weight),
                       quantize_ggml(w, name, importance=per_weight))


def _weighted_error(w, name, imp, importance):
    deq = dequantize_ggml(quantize_ggml(w, name, importance=importance), w.shape, name)
    return (imp.double() * (w.double() - deq.double()) ** 2).sum().item()


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("per_weight", [False, True], ids=["vector", "per_weight"])
def test_importance_lowers_the_weighted_error(name, per_weight):
    w = _heavy_tailed()
    imp = _spread_importance((16, 1024) if per_weight else 1024)
    weighted, plain = _weighted_error(w, name, imp, imp), _weighted_error(w, name, imp, None)
    assert weighted < 0.95 * plain


def test_q8_0_ignores_importance():
    w = _heavy_tailed()
    plain = quantize_ggml(w, "q8_0")
    assert torch.equal(quantize_ggml(w, "q8_0", importance=_spread_importance(1024)), plain)
    assert torch.equal(quantize_ggml(w, "q8_0", importance=_spread_importance((16, 1024))), plain)


@pytest.mark.parametrize("name", list(GGML_FORMATS))
def test_weighted_bytes_dequantize_as_gguf_py_does(name):
    fmt = GGML_FORMATS[name]
    w = _heavy_tailed(6, 512, seed=3)
    for imp in (_spread_importance(512), _spread_importance((6, 512), seed=4)):
        raw = quantize_ggml(w, name, importance=imp)
        assert np.array_equal(dequantize_ggml(raw, w.shape, name).numpy(), gguf_dequantize(raw.numpy(), fmt.ggml_type))


@pytest.mark.parametrize("name", ["q4_0", "q4_k"])
def test_quantize_with_a_gguf_config_passes_importance(name):
    w = _heavy_tailed()
    imp = _spread_importance(1024)
    qt = quantize(w, QuantConfig(f"gguf:{name}"), importance=imp)
    assert torch.equal(qt.tensors["codes"], quantize_ggml(w, name, importance=imp))
    assert not torch.equal(qt.tensors["codes"], quantize_ggml(w, name))


@pytest.mark.parametrize("importance,problem", [
    (torch.ones(512), r"shape"),
    (torch.ones(8, 1024), r"shape"),
    (torch.ones(16, 1024, 1), r"shape"),
    (torch.ones(1024).index_fill(0, torch.tensor([7]), -1.0), r"negative"),
    (torch.ones(16, 1024).index_fill(1, torch.tensor([7]), float("nan")), r"(?i)nan|finite"),
    (torch.ones(1024).index_fill(0, torch.tensor([7]), float("inf")), r"(?i)inf|finite"),
    ([1.0] * 1024, r"(?i)tensor"),
], ids=["short", "rows", "3d", "negative", "nan", "inf", "list"])
def test_bad_importance_is_refused_naming_the_problem(importance, problem):
    with pytest.raises(QbaraError, match=problem):
        quantize_ggml(_heavy_tailed(), "q4_k", name="layers.0.q_proj", importance=importance)


@pytest.mark.parametrize("config", ["nf4", "int4"])
def test_importance_with_a_non_gguf_config_is_refused(config):
    with pytest.raises(QbaraError, match="importance"):
        quantize(_heavy_tailed(), QuantConfig(config), importance=torch.ones(1024))


@pytest.mark.parametrize("nmax", [63, 15])
def test_make_qp_quants_never_worse_than_its_grid_guess(nmax):
    """Columns of non-negative values (sub-block scales) with positive weights: codes in [0, nmax], and the
    weighted error at or below the guess scale = max / nmax, codes = round(x / scale), lower overall."""
    g = torch.Generator().manual_seed(nmax)
    x = torch.rand(16, 400, generator=g).pow(2) * torch.rand(1, 400, generator=g)
    w = torch.exp(2 * torch.randn(16, 400, generator=g))
    scale, codes = make_qp_quants(x, nmax, w)
    assert scale.shape == (400,) and codes.shape == (16, 400)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= nmax
    guess_scale = x.amax(0) / nmax
    guess = torch.round(x / guess_scale)

    def error(s, q):
        return (w.double() * (x.double() - s.double() * q.double()) ** 2).sum(0)

    searched, plain = error(scale, codes), error(guess_scale, guess)
    assert torch.all(searched <= plain + 1e-6 * (w.double() * x.double() ** 2).sum(0))
    assert searched.sum() < 0.9 * plain.sum()


def test_make_qp_quants_all_zero_column():
    x = torch.rand(16, 3)
    x[:, 1] = 0
    scale, codes = make_qp_quants(x, 63, torch.ones(16, 3))
    assert scale[1] == 0 and torch.all(codes[:, 1] == 0) and scale[0] > 0
