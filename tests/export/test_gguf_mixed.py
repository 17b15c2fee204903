"""Mixed-format base export: gguf:* layers go out as their own block bytes, INT4 G32 layers as Q4_1."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

import qbara
from qbara import QuantConfig
from qbara.export import export_gguf
from qbara.export.gguf import LINEARS, llama_rope_permutation
from qbara.models import tiny_llama
from qbara.quant.ggml import GGML_FORMATS, dequantize_ggml, quantize_ggml

from .conftest import INT4_G32, snap_to_q8_0

# K-quants need d_in % 256 == 0: hidden 256, intermediate 512 (4 heads of 64, 2 KV heads).
WIDE = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 512}
# Every GGML format once, and INT4 G32 (Q4_1 packed from codes) twice; the K-quants on q/k too.
FORMATS = [
    {"self_attn.q_proj": "gguf:q4_k", "self_attn.k_proj": "gguf:q2_k", "self_attn.v_proj": "gguf:q3_k",
     "self_attn.o_proj": "gguf:q5_k", "mlp.gate_proj": "gguf:q8_0", "mlp.up_proj": "int4",
     "mlp.down_proj": "gguf:q6_k"},
    {"self_attn.q_proj": "gguf:q4_0", "self_attn.k_proj": "gguf:q6_k", "self_attn.v_proj": "gguf:q5_1",
     "self_attn.o_proj": "gguf:q4_1", "mlp.gate_proj": "int4", "mlp.up_proj": "gguf:q5_0",
     "mlp.down_proj": "gguf:q4_k"},
]


def _config(fmt):
    return INT4_G32 if fmt == "int4" else QuantConfig(fmt)


def unpermute_rows(rows, n_head):
    out = np.empty_like(rows)
    out[llama_rope_permutation(rows.shape[0], n_head).numpy()] = rows
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    model, tokenizer = tiny_llama(seed=4, **WIDE)
    snap_to_q8_0(model)
    per_layer = {f"model.layers.{i}.{sub}": _config(fmt) for i, row in enumerate(FORMATS) for sub, fmt in row.items()}
    qbara.prepare(model, per_layer)
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    return model, tokenizer, path, export_gguf(model, tokenizer, path)


def test_every_block_format_keeps_rows_independent():
    """Rows move whole: quantizing row-permuted weights gives the row-permuted bytes, for every format
    (a K-quant row is its own run of 256-weight super-blocks), so the rope permutation stays exact."""
    weight = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    perm = llama_rope_permutation(16, 2)
    for name, fmt in GGML_FORMATS.items():
        raw = quantize_ggml(weight, fmt)
        assert raw.shape == (16, fmt.row_bytes(512))
        assert torch.equal(quantize_ggml(weight[perm], fmt), raw[perm]), name
        assert torch.equal(dequantize_ggml(raw[perm], (16, 512), fmt), dequantize_ggml(raw, (16, 512), fmt)[perm])


def assert_layers_are_their_own_blocks(model, path) -> dict:
    """Every linear of `model` read back from the GGUF at `path` by gguf-py: its dequantized weight equals the
    layer's, and a gguf:* layer's raw bytes are its own blocks under its GGML type (q/k rows un-permuted).
    Returns GGUF tensor name -> tensor type."""
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    config, types = model.config, {}
    for i, layer in enumerate(model.model.layers):
        for sub, gguf_name in LINEARS:
            module = layer.get_submodule(sub)
            name = f"blk.{i}.{gguf_name}.weight"
            t = tensors[name]
            types[name] = t.tensor_type
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name)
            got = dequantize(t.data, t.tensor_type)  # gguf-py's own decoder
            if heads:
                got = unpermute_rows(got, heads)
            assert np.array_equal(got, module.dequantize(torch.float32).numpy()), name
            if module.quant_config.kind == "gguf":
                assert t.tensor_type == module.quant_config.ggml.ggml_type
                raw = np.asarray(t.data)
                raw = unpermute_rows(raw, heads) if heads else raw
                assert np.array_equal(raw, module.qweight.tensors["codes"].numpy()), name
    return types


def test_gguf_layers_are_their_own_blocks(mixed):
    model, _, path, report = mixed
    types = assert_layers_are_their_own_blocks(model, path)
    for i, row in enumerate(FORMATS):
        for sub, gguf_name in LINEARS:
            if row[sub] == "int4":
                assert types[f"blk.{i}.{gguf_name}.weight"] == GGMLQuantizationType.Q4_1
    assert report.lossless and len(report.exact_ggml) == 12 and len(report.exact_q4_1) == 2


def test_report_counts_formats_and_bits(mixed):
    model, _, path, report = mixed
    assert report.format_counts == {"Q2_K": 1, "Q3_K": 1, "Q4_0": 1, "Q4_1": 3, "Q4_K": 2, "Q5_0": 1, "Q5_1": 1,
                                    "Q5_K": 1, "Q6_K": 2, "Q8_0": 1}
    assert report.linear_types["model.layers.0.self_attn.q_proj"] == "Q4_K"
    linears = [layer.get_submodule(sub) for layer in model.model.layers for sub, _ in LINEARS]
    weights = sum(m.qweight.numel for m in linears)
    want = sum(m.quant_config.bits_per_param * m.qweight.numel for m in linears) / weights
    assert report.linear_bits_per_param == pytest.approx(want)
    reader = GGUFReader(str(path))
    data = sum(int(t.n_bytes) for t in reader.tensors)
    params = sum(int(t.n_elements) for t in reader.tensors)
    assert report.bits_per_param == pytest.approx(8 * data / params)
    summary = report.summary()
    assert "lossless: 14 linear layers" in summary and "3 Q4_1" in summary and "bits/param" in summary
    # general.file_type names the type holding the most linear weights (Q4_1: 3 layers incl. a 512x256 one)
    assert reader.fields["general.file_type"].contents() == int(gguf_file_type("MOSTLY_Q4_1"))


def gguf_file_type(name):
    from gguf import LlamaFileType

    return LlamaFileType[name]


def test_mixed_file_loads_through_transformers_with_matching_logits(mixed):
    model, _, path, _ = mixed
    loaded, _ = qbara.load_model(str(path))
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_lossy_requantizes_a_gguf_base_into_its_own_format(tmp_path):
    """A layer whose (gguf:*) base took a non-folding adapter is merged densely and re-quantized into
    its own format with lossy=True; without it the refusal names the fix."""
    from qbara import AdapterConfig, QbaraError
    from tests.helpers import randomize_adapters

    model, tokenizer = tiny_llama(seed=2, **WIDE)
    qbara.prepare(model, QuantConfig("gguf:q8_0"), AdapterConfig("qahira", rank=4))
    randomize_adapters(model, 2)
    with pytest.raises(QbaraError, match="gguf:q8_0 keeps GGML's block bytes.*--allow-requantize"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", lossy=True)
    assert set(report.format_counts) == {"Q8_0"} and len(report.requantized) == 14
    assert 0 < report.requantize_error < 0.02
