"""GGML block formats (qbara.quant.ggml): bytes gguf-py reads back bit for bit, ggml's reference quantizers,
and the gguf:* QuantConfig formats."""
import hashlib

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qbara.errors import QbaraError
from qbara.quant import QuantConfig, quantize
from qbara.quant.ggml import GGML_FORMATS, dequantize_ggml, quantize_ggml
from qbara.quant.ggml.iquants import LEVELS
from qbara.quant.ggml.searches import make_q3_quants, make_qkx2_quants, make_qx_quants

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
BITS_PER_PARAM = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5,
                  "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "iq3_s": 3.4375, "iq3_xxs": 3.0625,
                  "iq4_nl": 4.5, "iq4_xs": 4.25}


def _weights(rows, cols, seed=0):
    """Gaussian rows, heavy-tailed rows, and the corner cases: zero / constant / one-signed blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[1::3] = torch.distributions.StudentT(3.0).sample((len(range(1, rows, 3)), cols)) * 0.01
    w[0, :256] = 0
    w[0, 256:272] = 0.01
    w[2] = w[2].abs()
    w[min(3, rows - 1), :32] = -w[min(3, rows - 1), :32].abs()
    return w


def _reference_input(rows=32, cols=1024):
    """A weight made with exact integer hashing and float64 arithmetic (the same on every platform): per
    super-block magnitudes 2**-5 .. 2**-9, a zero super-block, zero and constant sub-blocks, one-signed rows."""
    i = np.arange(rows * cols, dtype=np.uint64)

    def uniform(k):
        h = (i * np.uint64(2654435761 + 2 * k) + np.uint64(40503 * k)) % np.uint64(2 ** 32)
        return (h >> np.uint64(8)).astype(np.float64) / 2 ** 24

    g = uniform(1) + uniform(2) + uniform(3) + uniform(4) - 2.0
    x = (g * 2.0 ** -((i // 256 * 7 % 5) + 5).astype(np.float64)).astype(np.float32)
    x[:256] = 0
    x[256 + 16:256 + 48] = 0
    x[600:616] = x[600]
    x = x.reshape(rows, cols)
    x[5], x[6] = np.abs(x[5]), -np.abs(x[6])
    return torch.from_numpy(x)


# sha256 of the bytes ggml's reference quantizers (ggml-quants.c quantize_row_*_ref, i.e. llama-quantize
# without an importance matrix; built with gcc -O2, no FMA) write for _reference_input(). The legacy formats'
# bytes are also what gguf-py's quantize writes (checked directly below).
REFERENCE_SHA256 = {
    "q2_k": "0e6224bdd3556280a2572c3b6e2751af244cc6b0b659de68992d3370a747e1cf",
    "q3_k": "0d8d0173e41f92d6e79e39918e8dc5ecd05e811a4a375833fd7cf7b6ce8fa613",
    "q4_k": "6db54320fd56dc406e3d051445c4c8a03911b0d19e7850bb7341be4e29ab6513",
    "q5_k": "48b3f4c4fdd27ea2851ae00f555e82f9a4840efb1303299f7f268199db81715b",
    "q6_k": "4f8372b227ff477a0665e084a246e4cf22c67834a38f8a4a8e09130fdc02c9d4",
    "q4_0": "68bcf9940323c82befa6d273300b4c3be25cee3eb9a550fb82e6f26e245d5c87",
    "q4_1": "9f79774176efcb227dbbb1573aa523123cf6529e23501ca194ba5c267c1b6298",
    "q5_0": "8f14286f8ad57443b9f40dcaf9b31e4528ff4312faaba757f6579953d9824afc",
    "q5_1": "8c95125b8eb4cc053b81c716d7f88eeb25fbb5258c37131d93707c5a8a73d1f9",
    "q8_0": "24370b64bfa8b330ba8e5c7bb3d421cd92857458f0afa8226797ef3d4682de43",
    "iq3_s": "88f536b95d04e57a229a8f8c509fb7f607147cbca0c8ba6eac62be9cb6c82260",  # bench/ggml_iquant_fixtures.py
    "iq3_xxs": "e829d9eb1bf09a1fe3fcb64621535fe7de3c0493334f1999bebd85c0d59527eb",
    "iq4_nl": "1a45820799f6c086078a756e1c193a5272c3fefd439cd0e6a8cee6d104caf7de",
    "iq4_xs": "ec48eafafdcdce259fcdcee7e986d553c1eb371c3204c82f83b39d5cd6ad5987",
}


def test_registry_matches_gguf_block_sizes():
    for name, fmt in GGML_FORMATS.items():
        assert fmt.ggml_type.name == name.upper()
        assert gguf.GGML_QUANT_SIZES[fmt.ggml_type] == (fmt.block_size, fmt.type_size)
        assert fmt.bits_per_param == BITS_PER_PARAM[name]


@pytest.mark.parametrize("name", list(GGML_FORMATS))
def test_bytes_equal_ggml_reference_quantizer(name):
    raw = quantize_ggml(_reference_input(), name)
    assert hashlib.sha256(raw.numpy().tobytes()).hexdigest() == REFERENCE_SHA256[name]


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("shape", [(8, 256), (7, 96)])
def test_legacy_bytes_equal_gguf_py_quantizer(name, shape):
    w = _weights(*shape)
    ours = quantize_ggml(w, name).numpy()
    assert ours.shape == (shape[0], shape[1] // 32 * GGML_FORMATS[name].type_size)
    assert np.array_equal(ours, gguf_quantize(w.numpy(), GGML_FORMATS[name].ggml_type))


@pytest.mark.parametrize("name", list(GGML_FORMATS))
@pytest.mark.parametrize("shape", [(6, 512), (3, 1536)])
def test_dequantize_equals_gguf_py_bit_for_bit(name, shape):
    fmt = GGML_FORMATS[name]
    w = _weights(*shape, seed=shape[1])
    raw = quantize_ggml(w, name)
    ours = dequantize_ggml(raw, shape, name)
    assert np.array_equal(ours.numpy(), gguf_dequantize(raw.numpy(), fmt.ggml_type))
    assert ((ours - w) ** 2).mean() < 0.2 * (w ** 2).mean()


@pytest.mark.parametrize("name", list(GGML_FORMATS))
def test_dequantize_random_bytes_equals_gguf_py(name):
    """Every code, scale and sign pattern (fp16 fields included: NaN and inf land in the same places)."""
    fmt = GGML_FORMATS[name]
    raw = torch.randint(0, 256, (4, fmt.row_bytes(1024)), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with np.errstate(invalid="ignore"):
        expected = gguf_dequantize(raw.numpy(), fmt.ggml_type)
    assert np.array_equal(dequantize_ggml(raw, (4, 1024), name).numpy(), expected, equal_nan=True)


def _rtn(w, bits, group):
    """Round-to-nearest min-max quantization, fp16 scale and min per `group` weights."""
    b = w.reshape(-1, group)
    lo, hi = b.amin(1, keepdim=True), b.amax(1, keepdim=True)
    s, m = ((hi - lo) / (2 ** bits - 1)).half().float(), lo.half().float()
    return (torch.round((b - m) / s.clamp(min=1e-12)).clamp(0, 2 ** bits - 1) * s + m).view_as(w)


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_error_below_rtn_at_the_same_bits(name):
    """K-quant vs min-max RTN with the same code bits in groups of 64 (bits + 0.5 per weight: the same budget,
    0.125 less for Q2_K's 2.625, 0.06 more for Q3_K's 3.44)."""
    w = _weights(16, 1024)
    bits = int(name[1])
    err = ((dequantize_ggml(quantize_ggml(w, name), w.shape, name) - w) ** 2).mean()
    assert err < 0.8 * ((_rtn(w, bits, 64) - w) ** 2).mean()


def _columns(n, seed=0):
    return (torch.randn(500, n, generator=torch.Generator().manual_seed(seed)) * 0.02).t().contiguous()


def _affine_error(x, w, nmax, rmin, steps, mad):
    scale, the_min, codes = make_qkx2_quants(x, w, nmax, rmin, 0.1, steps, mad)
    diff = codes * scale - the_min - x
    return (w * (diff.abs() if mad else diff ** 2)).double().sum(0)


@pytest.mark.parametrize("nmax,rmin,nstep,mad", [(15, -1.0, 20, False), (31, -0.5, 15, False), (3, -0.5, 15, True)],
                         ids=["q4_k", "q5_k", "q2_k"])
def test_affine_search_never_worse_than_its_min_max_guess(nmax, rmin, nstep, mad):
    x = _columns(32 if nmax > 3 else 16)
    w = x.abs() + x.pow(2).mean(0).sqrt() if nmax > 3 else x.abs()
    guess, searched = _affine_error(x, w, nmax, rmin, -1, mad), _affine_error(x, w, nmax, rmin, nstep, mad)
    assert torch.all(searched <= guess * (1 + 1e-5)) and searched.sum() < 0.97 * guess.sum()


@pytest.mark.parametrize("search,nmax,kwargs", [(make_q3_quants, 4, {"sweeps": 0}), (make_qx_quants, 32, {"steps": 0})])
def test_symmetric_searches_never_worse_than_their_absmax_guess(search, nmax, kwargs):
    x = _columns(16)

    def error(**kw):
        scale, codes = search(x, nmax, **kw)
        return (x * x * (x - scale * (codes - nmax)) ** 2).double().sum(0)

    # ggml ranks the grids by sum(w*x*l)^2 / sum(w*l*l) in float32, so "never worse" holds to float32
    # precision of sum(w*x*x) (a near-tie may go either way), and the search gains overall.
    guess, searched = error(**kwargs), error()
    assert torch.all(searched <= guess + 1e-6 * (x.double() ** 4).sum(0)) and searched.sum() < 0.95 * guess.sum()


def _codes(g, shape, levels, present):
    """Random codes in [0, levels) with each of `present` at a random place of every last-axis row."""
    q = torch.randint(0, levels, shape, generator=g)
    places = torch.rand(shape, generator=g).argsort(-1)
    for i, code in enumerate(present):
        q.scatter_(-1, places[..., i:i + 1], code)
    return q.float()


def _iq4_levels(codes):
    """IQ4 codes -> their codebook levels (as the dequantizer looks them up)."""
    return torch.tensor(LEVELS, dtype=torch.float32)[codes.long()]


def _fp16(shape, g, low, high):
    return (torch.rand(shape, generator=g) * (high - low) + low).half().float()


def _grid_weight(name, rows, cols, seed=0):
    """A weight on the format's grid in the form its reference quantizer re-derives: every block (sub-block)
    reaches the code the scale is taken from (both ends for min-max formats) and, for K-quants, the largest
    sub-block scale / min has the top 6-bit (Q2_K: 4-bit) code. Values as the dequantizer computes them."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    if name in ("q4_0", "q5_0"):
        half = 8 if name == "q4_0" else 16
        d = _fp16((n // 32, 1), g, -1e-3, 1e-3)
        return (d * (_codes(g, (n // 32, 32), 2 * half, [0]) - half)).view(rows, cols)
    if name in ("q4_1", "q5_1"):
        top = 15 if name == "q4_1" else 31
        d = _fp16((n // 32, 1), g, 1e-4, 1e-3)
        m = (d * top * (1 - 2 * torch.rand(n // 32, 1, generator=g))).half().float()
        return (d * _codes(g, (n // 32, 32), top + 1, [0, top]) + m).view(rows, cols)
    if name == "q8_0":
        return (_fp16((n // 32, 1), g, 1e-5, 1e-4) * (_codes(g, (n // 32, 32), 255, [0, 254]) - 127)).view(rows, cols)
    if name == "iq4_nl":  # every block reaches level 0 (-127)
        return (_fp16((n // 32, 1), g, -1e-3, 1e-3) * _iq4_levels(_codes(g, (n // 32, 32), 16, [0]))).view(rows, cols)
    blocks = n // 256
    if name == "iq4_xs":  # signed 6-bit sub-block scales l - 32 in [-32, 31] \ {0}, one at -32 per super-block
        d = _fp16((blocks, 1, 1), g, -1e-4, 1e-4)
        ls = _codes(g, (blocks, 8), 63, [0]) - 32
        ls = torch.where(ls >= 0, ls + 1, ls)
        return ((d * ls[..., None]) * _iq4_levels(_codes(g, (blocks, 8, 32), 16, [0]))).view(rows, cols)
    if name in ("q2_k", "q4_k", "q5_k"):
        top, sub, scale_top = {"q2_k": (3, 16, 15), "q4_k": (15, 32, 63), "q5_k": (31, 32, 63)}[name]
        d, dmin = _fp16((blocks, 1, 1), g, 1e-5, 1e-4), _fp16((blocks, 1, 1), g, 1e-5, 1e-4)
        sc = _codes(g, (blocks, 256 // sub), scale_top, [scale_top - 1]) + 1
        m = _codes(g, (blocks, 256 // sub), scale_top + 1, [scale_top])
        q = _codes(g, (blocks, 256 // sub, sub), top + 1, [0, top])
        return ((d * sc[..., None]) * q - dmin * m[..., None]).view(rows, cols)
    half, scale_top = {"q3_k": (4, 32), "q6_k": (32, 128)}[name]  # signed sub-block scales, one at -scale_top
    d = _fp16((blocks, 1, 1), g, 1e-5, 1e-4)
    sign = 1 - 2 * torch.randint(0, 2, (blocks, 16), generator=g)
    s = torch.randint(1, scale_top, (blocks, 16), generator=g).float() * sign
    s[torch.arange(blocks), torch.randint(0, 16, (blocks,), generator=g)] = -scale_top
    q = _codes(g, (blocks, 16, 16), 2 * half, [0]) - half
    return ((d * s[..., None]) * q).view(rows, cols)


# IQ3_S / IQ3_XXS store the super-block scale as the fitted one times 1.033 / 1.0125 (ggml's fudge factors): no
# weight is a fixed point.
@pytest.mark.parametrize("name", [n for n in GGML_FORMATS if not n.startswith("iq3")])
def test_weight_on_the_grid_requantizes_to_itself(name):
    """A grid weight comes back unchanged. Only grids of the form above can: the reference quantizer takes each
    block's scale from its own extreme values (and a K-quant's super-block scale from its largest sub-block
    scale), so a grid whose blocks do not reach those codes is re-expressed on a finer grid (random K-quant
    bytes almost never are a fixed point, while legacy quantizer output always is: see below)."""
    w = _grid_weight(name, 16, 1024)
    assert torch.equal(dequantize_ggml(quantize_ggml(w, name), w.shape, name), w)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_quantizer_output_is_a_fixed_point(name):
    w = _weights(16, 512)
    once = dequantize_ggml(quantize_ggml(w, name), w.shape, name)
    assert torch.equal(dequantize_ggml(quantize_ggml(once, name), w.shape, name), once)


@pytest.mark.parametrize("name", list(GGML_FORMATS))
def test_quantized_tensor_holds_the_block_bytes(name):
    config = QuantConfig(f"gguf:{name}")
    w = _weights(16, 512)
    qt = quantize(w, config)
    raw = qt.tensors["codes"]
    assert list(qt.tensors) == ["codes"] and raw.dtype == torch.uint8
    assert torch.equal(raw, quantize_ggml(w, name))
    assert qt.bits_per_param == config.bits_per_param == BITS_PER_PARAM[name]
    dense = qt.dequantize()
    assert torch.equal(dense, dequantize_ggml(raw, w.shape, name))
    assert torch.equal(qt.dequantize_into(torch.full((w.numel(),), float("nan"))), dense)
    assert torch.equal(qt.dequantize(torch.bfloat16), dense.bfloat16())
    with pytest.raises(QbaraError, match="dequantize"):
        qt.codes()


@pytest.mark.parametrize("name", ["q4_1", "q3_k", "q6_k"])
def test_quantized_linear_forward_and_backward(name):
    from qbara.nn.quantized_linear import QuantizedLinear

    layer = QuantizedLinear.from_linear(torch.nn.Linear(512, 24, bias=True), QuantConfig(f"gguf:{name}"))
    weight = layer.dequantize()
    x = torch.randn(3, 5, 512, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, x @ weight.t() + layer.bias)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(3, 5, 24) @ weight)


def test_config_and_shape_errors_name_the_fix():
    config = QuantConfig("gguf:q4_k")
    assert (config.kind, config.bits, config.block_size, config.double_quant) == ("gguf", 4, 256, False)
    assert config.label == "gguf:q4_k"
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(QbaraError, match=r"layers\.0\.q_proj: gguf:q4_k stores blocks of 256 .* 576 input features; "
                                         r"use one of gguf:q4_0.*gguf:q8_0, gguf:iq4_nl, or leave"):
        quantize(torch.randn(8, 576), config, name="layers.0.q_proj")
    with pytest.raises(QbaraError, match="takes no block_size=32"):
        QuantConfig("gguf:q4_k", block_size=32)
    with pytest.raises(QbaraError, match="takes no double_quant=True"):
        QuantConfig("gguf:q4_0", double_quant=True)
    with pytest.raises(QbaraError, match="unknown quantization format 'gguf:q7_k'.*gguf:q6_k"):
        QuantConfig("gguf:q7_k")
    with pytest.raises(QbaraError, match="float weight"):
        quantize_ggml(torch.zeros(2, 32, dtype=torch.int32), "q8_0")


def test_gguf_base_is_not_foldable():
    from qbara.quant.fold import fold_problem

    problem = fold_problem(QuantConfig("gguf:q4_1"), 1, 32)
    assert "int4 with block_size=32" in problem and "int5 with block_size=32" in problem


def test_layer_buffers_round_trip_through_safetensors(tmp_path):
    """What a native quantized folder stores per layer: the one uint8 block buffer, of the shape and dtype the
    loader expects (buffer_layout), rebuilt into the same layer."""
    from safetensors.torch import load_file, save_file

    from qbara.models.quantized_io import buffer_layout
    from qbara.nn.quantized_linear import QuantizedLinear
    from qbara.quant.tensor import QuantizedTensor

    config = QuantConfig("gguf:q5_k")
    layer = QuantizedLinear.from_linear(torch.nn.Linear(512, 16, bias=False), config)
    save_file(layer.state_dict(), str(tmp_path / "layer.safetensors"))
    state = load_file(str(tmp_path / "layer.safetensors"))
    layout = buffer_layout(config, (16, 512))
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {k: (v.shape, v.dtype) for k, v in layout.items()}
    rebuilt = QuantizedLinear(QuantizedTensor(config, (16, 512), state))
    x = torch.randn(2, 512)
    assert torch.equal(rebuilt(x), layer(x))


def test_weights_beyond_the_fp16_range_of_block_scales_are_refused():
    """Finite weights whose block scale would overflow fp16 (a block absmax above 65504) are refused, not turned
    into inf."""
    weight = torch.randn(4, 256) * 1e6
    with pytest.raises(QbaraError, match="beyond the fp16 range"):
        quantize(weight, QuantConfig("gguf:q4_0"), "big")
    assert torch.isfinite(quantize(weight / 1e3, QuantConfig("gguf:q4_k")).dequantize()).all()
