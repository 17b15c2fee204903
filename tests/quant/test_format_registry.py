"""The format registry's contract: every family quantizes and dequantizes through QuantConfig, its bits/param and
buffer layout are those of the buffers it really stores, and a new family is one object plus one `register` call
(here a toy symmetric INT8 family defined in this file, touching no other module)."""
import pytest
import torch
from torch import Tensor

from qbara import QbaraError, prepare
from qbara.models import tiny_llama
from qbara.models.quantized_io import load_quantized
from qbara.native import save_quantized
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant import QuantConfig, dequantize, quantize
from qbara.quant.fold import fold_problem
from qbara.quant.formats import FAMILIES, FORMATS, family_of, register, unregister
from qbara.quant.formats.base import BlockFormat

# A few configs per family, covering each buffer set (NF: fp32 absmax, qbara and bnb double quant; INT: fp16
# and fp32 minima, 2-D tiles, 3-bit codes; GGML: 32- and 256-weight blocks).
CONFIGS = [QuantConfig("nf4"), QuantConfig("nf3", 32), QuantConfig("nf2", 64, double_quant=False),
           QuantConfig("nf4", 64, dq_style="bnb"), QuantConfig("nf8", 32, dq_bits=4, dq_dtype="bf16"),
           QuantConfig("int4", 32), QuantConfig("int3", 64), QuantConfig("int5", 32, minimum_dtype="fp32"),
           QuantConfig("int4", 16, block_rows=4), QuantConfig("int8", 64),
           QuantConfig("gguf:q4_0"), QuantConfig("gguf:q8_0"), QuantConfig("gguf:q4_k"), QuantConfig("gguf:iq4_nl")]
# Shapes: full scale groups, a partial last group / rows not a multiple of 8 (one chunk).
SHAPES = [(64, 256), (20, 512)]


def _weight(shape, seed=0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_every_format_belongs_to_one_registered_family():
    assert {family_of(f).name for f in FORMATS} == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.name == name and family.formats
        assert all(f.startswith(family.prefix) and family_of(f) is family for f in family.formats)
    assert {c.family.name for c in CONFIGS} == set(FAMILIES)  # the configs below cover every family


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_family_round_trip_bits_and_layout(config, shape):
    weight = _weight(shape)
    qt = quantize(weight, config)
    assert qt.config.family is family_of(config.format) and config.kind == config.family.name
    dense = dequantize(qt)
    assert dense.shape == shape and dense.dtype == torch.float32
    error = float((dense - weight).norm() / weight.norm())
    assert error < 2.0 ** (2 - config.bits)  # the relative error of a b-bit grid
    out = torch.full((qt.numel,), float("nan"))
    into = qt.dequantize_into(out)
    if into is not None:
        assert into.data_ptr() == out.data_ptr() and torch.equal(into.view(shape), dense)
    # the layout a saved tensor is checked against is the buffers quantize writes
    layout = config.family.buffer_layout(config, shape)
    assert {k: (tuple(t.shape), t.dtype) for k, t in layout.items()} == \
           {k: (tuple(t.shape), t.dtype) for k, t in qt.tensors.items()}
    # bits/param: measured from the buffers; the formula leaves out only one fp32 offset per double-quantized
    # matrix and a partial last group of scales
    assert qt.bits_per_param == 8 * qt.nbytes / qt.numel
    if not config.double_quant:
        assert qt.bits_per_param == config.bits_per_param
    elif shape == SHAPES[0] and config.block_size * config.dq_block_size <= qt.numel:
        assert qt.bits_per_param == pytest.approx(config.bits_per_param + 32 / qt.numel, abs=1e-12)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_config_records_read_back(config):
    assert QuantConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------------ a toy family
class Sym8(BlockFormat):
    """Symmetric INT8: q = round(w / s) in [-127, 127] with one fp16 scale s = absmax / 127 per block of a row.
    Buffers: `codes` (int8, one per weight), `scale` (fp16 per block). Layout found by the base class (it
    quantizes zeros), so only the arithmetic is written here."""

    name = "sym"
    prefix = "sym"
    formats = ("sym8",)
    default_block_size = 32

    def check_options(self, config) -> None:
        if config.double_quant or config.block_rows != 1 or config.minimum_dtype != "fp16":
            raise QbaraError(f"{config.format} takes block_size only")

    def bits_per_param(self, config) -> float:
        return 8 + 16 / config.block_size

    def quantize(self, weight, config, name, importance):
        blocks = weight.detach().float().reshape(-1, config.block_size)
        scale = (blocks.abs().amax(dim=1) / 127).half()
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale.float()))
        return {"codes": torch.round(blocks / safe[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1),
                "scale": scale}

    def dequantize(self, qtensor, dtype):
        t, c = qtensor.tensors, qtensor.config
        blocks = t["codes"].float().view(-1, c.block_size) * t["scale"].float()[:, None]
        return blocks.view(qtensor.shape).to(dtype)

    def codes(self, qtensor):
        return qtensor.tensors["codes"]


@pytest.fixture
def sym8():
    family = register(Sym8())
    yield family
    unregister(family.name)
    with pytest.raises(QbaraError, match="unknown quantization format 'sym8'"):
        QuantConfig("sym8")


def test_a_new_family_is_one_object_and_one_registration(sym8):
    config = QuantConfig("sym8", 64)
    assert config.family is sym8 and config.kind == "sym" and config.label == "sym8"
    assert QuantConfig("sym8").block_size == 32 and QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(QbaraError, match="takes block_size only"):
        QuantConfig("sym8", block_rows=2)
    with pytest.raises(QbaraError, match="block_size 64 does not divide its 96"):
        quantize(_weight((4, 96)), config)
    with pytest.raises(QbaraError, match="importance"):
        quantize(_weight((4, 128)), config, importance=torch.ones(128))
    weight = _weight((24, 128))
    qt = quantize(weight, config)
    assert float((qt.dequantize() - weight).abs().max()) <= float(qt.tensors["scale"].float().max()) * 0.51
    assert qt.bits_per_param == config.bits_per_param == 8.25
    assert qt.codes().dtype == torch.int8 and qt.dequantize_into(torch.empty(qt.numel)) is None
    layout = sym8.buffer_layout(config, (24, 128))
    assert {k: (tuple(t.shape), t.dtype) for k, t in layout.items()} == {"codes": ((3072,), torch.int8),
                                                                         "scale": ((48,), torch.float16)}
    assert "no zero-point" in fold_problem(config, 1, 64)  # the base class's answer: nothing folds into it
    with pytest.raises(QbaraError, match="no GGUF block layout"):
        sym8.gguf_blocks(qt, "layer")


def test_a_new_family_goes_through_the_model_pipeline_and_native_folders(sym8, tmp_path):
    """prepare() quantizes a model's linears with it, and a native folder saves and loads it (the layout check
    of the loader is the family's `buffer_layout`) with no other module changed."""
    model, tokenizer = tiny_llama(seed=0, hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128)
    prepare(model, QuantConfig("sym8", 32), None)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    loaded, _ = load_quantized(save_quantized(model, tokenizer, tmp_path / "sym8"))
    assert {m.quant_config.format for m in loaded.modules() if isinstance(m, QuantizedLinear)} == {"sym8"}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
