"""INT5 G32 layers go out as GGUF Q5_1 packed from their own codes, as INT4 G32 goes out as Q4_1: QA-HiRA and
QA-LoRA updates folded into the fp16 minima survive bit for bit, and one file may mix Q4_1 and Q5_1."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.quants import dequantize

import qbara
from qbara import AdapterConfig, QbaraError, QuantConfig, merge
from qbara.adapters import adapter_layers
from qbara.export import export_gguf
from qbara.export.gguf import LINEARS, llama_rope_permutation
from qbara.nn import QuantizedLinear

from .conftest import INT4_G32, tiny_adapted

INT5_G32 = QuantConfig("int5", block_size=32)
ADAPTERS = {"qahira": AdapterConfig("qahira", rank=8, alpha=16), "qalora": AdapterConfig("qalora", rank=4, alpha=8)}


def read_linears(path, config) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    """HF layer name -> (GGML type, weight decoded by gguf-py, rows back in HF order) of every linear layer."""
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    out = {}
    for i in range(config.num_hidden_layers):
        for sub, gguf_name in LINEARS:
            t = tensors[f"blk.{i}.{gguf_name}.weight"]
            weight = dequantize(t.data, t.tensor_type)
            if gguf_name in heads:
                unpermuted = np.empty_like(weight)
                unpermuted[llama_rope_permutation(weight.shape[0], heads[gguf_name]).numpy()] = weight
                weight = unpermuted
            out[f"model.layers.{i}.{sub}"] = (t.tensor_type, weight)
    return out


@torch.no_grad()
def adapter_weights(model) -> dict[str, dict[str, torch.Tensor]]:
    """Per adapted layer: the adapter model's dense weight W + ΔW, the base W, and each block's exact moved
    minimum m + c (what the fold would store without fp16 rounding)."""
    out = {}
    for name, layer in adapter_layers(model).items():
        base, delta = layer.base.dequantize(), layer.delta_weight().float()
        exact_min = layer.base.qweight.tensors["minimum"].float() + delta[:, ::32].reshape(-1)
        out[name] = {"dense": base + delta, "base": base, "exact_min": exact_min}
    return out


def assert_within_fp16_minima(got: np.ndarray, want: dict[str, torch.Tensor], name: str) -> None:
    """got equals W + ΔW up to the fp16 rounding of each moved minimum (half an ulp), and holds ΔW."""
    got, dense = torch.from_numpy(got), want["dense"]
    half_ulp = want["exact_min"].abs() * 2.0**-11 + 2.0**-25
    err = (got - dense).reshape(-1, 32).abs().amax(dim=1)
    assert torch.all(err <= half_ulp + 1e-7 * dense.abs().max()), name
    lost = float((got - dense).norm() / (dense - want["base"]).norm())
    assert lost < 0.1, (name, lost)  # what fp16 minima round away is a small part of a real update


@pytest.fixture(scope="module", params=list(ADAPTERS))
def folded(request, tmp_path_factory, ids):
    """A tiny INT5-G32 model with a non-zero adapter: its dense weights and logits, then merged into the
    quantized base and exported."""
    model, tokenizer = tiny_adapted(seed=2, quant=INT5_G32, adapter=ADAPTERS[request.param])
    weights = adapter_weights(model)
    with torch.no_grad():
        adapter_logits = model(ids).logits
    merge(model, into="quantized")
    path = tmp_path_factory.mktemp("q5_1") / f"{request.param}.gguf"
    report = export_gguf(model, tokenizer, path)
    return dict(model=model, path=path, report=report, weights=weights, adapter_logits=adapter_logits)


def test_folded_int5_layers_are_written_as_q5_1_bit_for_bit(folded):
    model, report = folded["model"], folded["report"]
    linears = read_linears(folded["path"], model.config)
    assert len(linears) == 14
    for name, (kind, got) in linears.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantizedLinear) and module.quant_config == INT5_G32
        assert kind == GGMLQuantizationType.Q5_1, name
        assert np.array_equal(got, module.dequantize(torch.float32).numpy()), name
    assert report.lossless and len(report.exact_q5_1) == 14 and not report.exact_q4_1
    assert set(report.linear_types.values()) == {"Q5_1"} and report.linear_bits_per_param == pytest.approx(6.0)
    assert "14 INT5 G32 packed as Q5_1" in report.summary()
    fields = {k: f.contents() for k, f in GGUFReader(str(folded["path"])).fields.items()}
    assert fields["general.file_type"] == int(LlamaFileType.MOSTLY_Q5_1)


def test_q5_1_file_holds_the_adapter_models_weights_to_fp16_rounding(folded):
    linears = read_linears(folded["path"], folded["model"].config)
    for name, want in folded["weights"].items():
        assert_within_fp16_minima(linears[name][1], want, name)


def test_q5_1_file_loads_back_with_the_adapter_models_logits(folded, ids):
    loaded, _ = qbara.load_model(str(folded["path"]))
    with torch.no_grad():
        logits = loaded(ids).logits
        merged = folded["model"](ids).logits
    ref = folded["adapter_logits"]
    assert (logits - ref).abs().max() / ref.abs().max() < 2e-3  # the fp16 rounding of the folded minima only
    assert (logits - merged).abs().max() / merged.abs().max() < 1e-5


def test_quantize_on_load_of_the_q5_1_file_as_int5_reproduces_its_weights(folded):
    """Loading the Q5_1 file with quant=INT5 G32 finds the same grid again (codes 0 and 31 in every block)."""
    loaded, _ = qbara.load_model(str(folded["path"]), quant=INT5_G32)
    for name in folded["weights"]:
        layer = loaded.get_submodule(name)
        assert layer.quant_config == INT5_G32
        assert torch.equal(layer.dequantize(), folded["model"].get_submodule(name).dequantize()), name


def test_int4_and_int5_layers_mix_in_one_file(tmp_path):
    five = ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")
    quant = {f"model.layers.{i}.{sub}": INT5_G32 if sub in five else INT4_G32 for i in range(2) for sub, _ in LINEARS}
    model, tokenizer = tiny_adapted(seed=3, quant=quant, adapter=ADAPTERS["qahira"])
    weights = adapter_weights(model)
    report = export_gguf(model, tokenizer, tmp_path / "mixed.gguf")  # merged on the fly
    model = merge(model, into="quantized")
    for name, (kind, got) in read_linears(tmp_path / "mixed.gguf", model.config).items():
        want = "Q5_1" if name.endswith(five) else "Q4_1"
        assert kind.name == want == report.linear_types[name], name
        assert np.array_equal(got, model.get_submodule(name).dequantize().numpy()), name
        assert_within_fp16_minima(got, weights[name], name)
    assert report.lossless and report.adapters_merged == 14
    assert (len(report.exact_q4_1), len(report.exact_q5_1)) == (6, 8)
    assert "(6 INT4 G32 packed as Q4_1, 8 INT5 G32 packed as Q5_1)" in report.summary()
    fields = {k: f.contents() for k, f in GGUFReader(str(tmp_path / "mixed.gguf")).fields.items()}
    assert fields["general.file_type"] == int(LlamaFileType.MOSTLY_Q5_1)  # 22,528 Q5_1 weights to 14,336 Q4_1


@pytest.mark.parametrize("quant", [QuantConfig("int5", block_size=64),
                                   QuantConfig("int5", block_size=32, minimum_dtype="fp32")], ids=lambda q: q.label)
def test_other_int5_layouts_need_lossy_and_go_out_as_q5_1(quant, tmp_path):
    model, tokenizer = tiny_adapted(quant=quant)
    with pytest.raises(QbaraError, match=r"INT4 / INT5 with block size 32.*QuantConfig\('int5', block_size=32\)"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", lossy=True)
    assert len(report.requantized) == 14 and set(report.linear_types.values()) == {"Q5_1"}
    assert 0 < report.requantize_error < 0.05


def test_q5_1_refuses_scales_that_fp16_cannot_hold(tmp_path):
    model, tokenizer = tiny_adapted(quant=INT5_G32)
    layer = model.model.layers[0].mlp.up_proj
    want = layer.dequantize().numpy()
    layer.scale = layer.scale.float()  # fp32 but fp16-exact: still written exactly
    export_gguf(model, tokenizer, tmp_path / "ok.gguf")
    assert np.array_equal(read_linears(tmp_path / "ok.gguf", model.config)["model.layers.0.mlp.up_proj"][1], want)
    layer.scale = layer.scale * (1 + 2.0**-14)  # between two fp16 values
    with pytest.raises(QbaraError, match=r"model.layers.0.mlp.up_proj: .*not exact in fp16.*as Q5_1 exactly"):
        export_gguf(model, tokenizer, tmp_path / "bad.gguf")
