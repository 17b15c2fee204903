"""GGUF export of every architecture in the table (llama, mistral, qwen2, qwen3, gemma3, phi3), each export kind:
INT4 G32 folded into Q4_1, dense F32 / F16, gguf:* bases, plain LoRA as a llama.cpp LoRA GGUF.

References: transformers' own GGUF reader (`from_pretrained(dir, gguf_file=...)`: names, q/k un-permutation,
Gemma's norm offset, fused Phi-3 tensors, hyper-parameters), gguf-py's reader, dequantizer and HF -> GGUF
tensor-name map. Where transformers' reader leaves a hyper-parameter out of its mapping though the file holds
it (qwen3's attention.key_length, Gemma 3's query_pre_attn_scalar that llama.cpp derives from key_length), the
test passes the model's value to from_pretrained and checks the key in the file itself.
"""
import gguf
import numpy as np
import pytest
import torch
import transformers as T
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

import qbara
from qbara import AdapterConfig, QbaraError, QuantConfig
from qbara.export import export_gguf, export_gguf_lora
from qbara.export.gguf import llama_rope_permutation
from qbara.export.gguf.architectures import ARCHITECTURES
from qbara.models.tiny import tiny_architecture
from tests.helpers import randomize_adapters

INT4_G32 = QuantConfig("int4", block_size=32)
# model_type -> (GGUF arch, what transformers' GGUF reader needs told)
SPECS = {
    "llama": ("llama", {}),
    "mistral": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "gemma3": ("gemma3", {"query_pre_attn_scalar": 16}),
    "phi3": ("phi3", {}),
}
ARCHS = list(SPECS)


def tiny(arch, seed=0, **overrides):
    """A tiny random model of `arch` (2 layers) with the tiny-llama byte tokenizer (`qbara.models.tiny`)."""
    return tiny_architecture(arch, seed=seed, **overrides)


def quantized(arch, adapter=None, quant=INT4_G32, seed=0):
    model, tokenizer = tiny(arch, seed)
    qbara.prepare(model, quant, adapter)
    if adapter is not None:
        randomize_adapters(model, seed, std=0.02)
    return model, tokenizer


def load_back(path, arch):
    return T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  **SPECS[arch][1]).eval()


def gguf_tensors(path):
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def gguf_fields(path):
    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}


def to_hf_rows(rows, arch, gguf_name, config):
    """HF row order from the file's (llama.cpp's rotary order for LLaMA / Mistral q/k)."""
    heads = ARCHITECTURES[arch].rope_heads(gguf_name, config)
    if heads is None:
        return rows
    out = np.empty_like(rows)
    out[llama_rope_permutation(rows.shape[0], heads).numpy()] = rows
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=ARCHS)
def folded(request, tmp_path_factory, ids):
    """Each architecture, INT4 G32 + QA-HiRA with random adapters: logits before and after merging, the merged
    model and its GGUF (F32 embedding)."""
    arch = request.param
    model, tokenizer = quantized(arch, AdapterConfig("qahira", rank=4, alpha=8))
    with torch.no_grad():
        adapter_logits = model(ids).logits
    qbara.merge(model, into="quantized")
    with torch.no_grad():
        merged_logits = model(ids).logits
    path = tmp_path_factory.mktemp(arch) / f"{arch}.gguf"
    report = export_gguf(model, tokenizer, path, embedding_type="f32")
    return dict(arch=arch, model=model, path=path, report=report, adapter_logits=adapter_logits,
                merged_logits=merged_logits)


# ------------------------------------------------------------------------------------ INT4 G32 -> Q4_1
def test_folded_export_loads_back_with_the_models_logits(folded, ids):
    loaded = load_back(folded["path"], folded["arch"])
    assert type(loaded).__name__ == type(folded["model"]).__name__ or folded["arch"] == "mistral"
    with torch.no_grad():
        got = loaded(ids).logits
    merged, adapter = folded["merged_logits"], folded["adapter_logits"]
    assert (got - merged).abs().max() / merged.abs().max() < 1e-5      # the same weights
    assert (got - adapter).abs().max() / adapter.abs().max() < 2e-3    # fp16 rounding of the folded minima
    assert folded["report"].lossless and len(folded["report"].exact_q4_1) == 2 * len(ARCHITECTURES[folded["arch"]]
                                                                                      .linears)


def test_tensor_names_types_and_bytes(folded):
    """Every tensor under the name gguf-py's HF -> GGUF map gives its HF parameter, with the intended type and
    the model's own values: Q4_1 blocks equal to the merged layers, norms F32 (Gemma's + 1), biases F32."""
    arch, model, path = folded["arch"], folded["model"], folded["path"]
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[SPECS[arch][0].upper()], config.num_hidden_layers)
    tensors = gguf_tensors(path)
    expected = {}
    for hf_name, param in model.named_parameters():
        module, suffix = hf_name.rsplit(".", 1)
        if ".lm_head" in f".{module}" and config.tie_word_embeddings:
            continue
        expected[f"{names.get_name(module)}.{suffix}"] = module
    for module_name, module in model.named_modules():  # quantized layers hold buffers, not parameters
        if isinstance(module, qbara.QuantizedLinear):
            expected[f"{names.get_name(module_name)}.weight"] = module_name
            if module.bias is not None:
                expected[f"{names.get_name(module_name)}.bias"] = module_name
    assert set(tensors) == set(expected)
    offset = 1.0 if arch == "gemma3" else 0.0
    for name, t in tensors.items():
        module = model.get_submodule(expected[name])
        gguf_name = name.split(".")[-2]
        if isinstance(module, qbara.QuantizedLinear) and name.endswith(".weight"):
            assert t.tensor_type == GGMLQuantizationType.Q4_1, name
            got = to_hf_rows(dequantize(t.data, t.tensor_type), arch, gguf_name, config)
            assert np.array_equal(got, module.dequantize(torch.float32).numpy()), name
        elif name.endswith(".bias"):
            assert t.tensor_type == GGMLQuantizationType.F32 and arch == "qwen2"
            assert np.array_equal(np.asarray(t.data), module.bias.detach().numpy()), name
        elif "norm" in name:
            assert t.tensor_type == GGMLQuantizationType.F32, name
            assert np.array_equal(np.asarray(t.data), (module.weight.detach() + offset).numpy()), name
        else:  # token_embd, output: F32 as asked
            assert t.tensor_type == GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(t.data).reshape(module.weight.shape), module.weight.detach().numpy())


EXPECTED_KEYS = {
    "llama": {"llama.rope.dimension_count": 16, "llama.vocab_size": 260},
    "mistral": {"llama.rope.dimension_count": 16},
    "qwen2": {"qwen2.rope.freq_base": 10000.0},
    "qwen3": {"qwen3.attention.key_length": 16, "qwen3.attention.value_length": 16},
    "gemma3": {"gemma3.attention.key_length": 16, "gemma3.attention.sliding_window": 64,
               "gemma3.rope.freq_base": 1e6},
    "phi3": {"phi3.rope.dimension_count": 16, "phi3.attention.sliding_window": 0,
             "phi3.rope.scaling.original_context_length": 4096},
}


def test_metadata(folded):
    arch = SPECS[folded["arch"]][0]
    fields = gguf_fields(folded["path"])
    assert fields["general.architecture"] == arch and folded["report"].architecture == arch
    assert (fields[f"{arch}.block_count"], fields[f"{arch}.embedding_length"], fields[f"{arch}.feed_forward_length"],
            fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"]) == (2, 64, 128, 4, 2)
    for key, value in EXPECTED_KEYS[folded["arch"]].items():
        assert fields[key] == pytest.approx(value), key
    assert fields["general.file_type"] == 3  # MOSTLY_Q4_1


# ------------------------------------------------------------------------------------ dense
@pytest.mark.parametrize("arch", ARCHS)
def test_dense_f32_export_is_exact_and_f16_reports_its_rounding(arch, tmp_path, ids):
    model, tokenizer = tiny(arch, seed=1)
    with pytest.raises(QbaraError, match="dense.*dense_type='f32'"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    report = export_gguf(model, tokenizer, tmp_path / "f32.gguf", embedding_type="f32", dense_type="f32")
    assert report.dense_error == 0.0 and len(report.dense) == 2 * len(ARCHITECTURES[arch].linears)
    assert set(report.linear_types.values()) == {"F32"} and gguf_fields(tmp_path / "f32.gguf")["general.file_type"] == 0
    tensors = gguf_tensors(tmp_path / "f32.gguf")
    for i, layer in enumerate(model.model.layers):
        for slot in ARCHITECTURES[arch].linears:
            got = to_hf_rows(np.asarray(tensors[f"blk.{i}.{slot.gguf}.weight"].data), arch, slot.gguf, model.config)
            assert np.array_equal(got, layer.get_submodule(slot.hf).weight.detach().numpy())
    with torch.no_grad():
        ref, got = model(ids).logits, load_back(tmp_path / "f32.gguf", arch)(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    f16 = export_gguf(model, tokenizer, tmp_path / "f16.gguf", embedding_type="f16", dense_type="f16")
    assert set(f16.linear_types.values()) == {"F16"} and 0 < f16.dense_error < 1e-3
    assert "unquantized" in f16.summary() and f"{f16.dense_error:.3e}" in f16.summary()
    with pytest.raises(QbaraError, match="dense_type 'bf16'.*f32, f16"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", dense_type="bf16")
    assert gguf_tensors(tmp_path / "f16.gguf")["blk.0.attn_output.weight"].tensor_type == GGMLQuantizationType.F16


# ------------------------------------------------------------------------------------ gguf:* bases
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_gguf_base_is_written_as_its_own_blocks(arch, tmp_path, ids):
    model, tokenizer = tiny(arch, seed=2)
    kinds = ["gguf:q8_0", "gguf:q5_0", "int4", "gguf:q4_1"]
    per_layer = {f"model.layers.{i}.{slot.hf}": INT4_G32 if kinds[(i + j) % 4] == "int4"
                 else QuantConfig(kinds[(i + j) % 4])
                 for i in range(2) for j, slot in enumerate(ARCHITECTURES[arch].linears)}
    qbara.prepare(model, per_layer)
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", embedding_type="f32")
    assert report.lossless and len(report.format_counts) >= 3
    tensors = gguf_tensors(tmp_path / "m.gguf")
    for name, config in per_layer.items():
        module = model.get_submodule(name)
        i, sub = int(name.split(".")[2]), name.split(".", 3)[3]
        slot = next(s for s in ARCHITECTURES[arch].linears if s.hf == sub)
        t = tensors[f"blk.{i}.{slot.gguf}.weight"]
        want_type = "Q4_1" if config is INT4_G32 else config.format.split(":")[1].upper()
        assert t.tensor_type.name == want_type
        got = to_hf_rows(dequantize(t.data, t.tensor_type), arch, slot.gguf, model.config)
        assert np.array_equal(got, module.dequantize(torch.float32).numpy()), name
    with torch.no_grad():
        ref, got = model(ids).logits, load_back(tmp_path / "m.gguf", arch)(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


# ------------------------------------------------------------------------------------ LoRA GGUF
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gguf_applied_as_llama_cpp_does_gives_the_adapter_models_weights(arch, tmp_path, ids):
    """W + (alpha / r) · B A per tensor, in the file's layout, then back to HF's order: the adapter model's
    weights; put into the base read back by transformers, its logits."""
    model, tokenizer = quantized(arch, AdapterConfig("lora", rank=4, alpha=8), seed=3)
    export_gguf(model, tokenizer, tmp_path / "base.gguf", separate_lora=True, embedding_type="f32")
    report = export_gguf_lora(model, tmp_path / "adapter.gguf")
    fields = gguf_fields(tmp_path / "adapter.gguf")
    assert fields["general.architecture"] == SPECS[arch][0] and fields["adapter.type"] == "lora"
    alpha = float(fields["adapter.lora.alpha"])
    base, lora = gguf_tensors(tmp_path / "base.gguf"), gguf_tensors(tmp_path / "adapter.gguf")
    assert len(lora) == 2 * len(report.ranks) == 4 * len(ARCHITECTURES[arch].linears)
    loaded = load_back(tmp_path / "base.gguf", arch)
    for i in range(model.config.num_hidden_layers):
        for slot in ARCHITECTURES[arch].linears:
            name = f"blk.{i}.{slot.gguf}.weight"
            w = dequantize(base[name].data, base[name].tensor_type).astype(np.float64)
            a, b = np.asarray(lora[f"{name}.lora_a"].data), np.asarray(lora[f"{name}.lora_b"].data)
            w = w + alpha / b.shape[1] * (b.astype(np.float64) @ a.astype(np.float64))
            w = to_hf_rows(w, arch, slot.gguf, model.config)
            layer = model.get_submodule(f"model.layers.{i}.{slot.hf}")
            want = (layer.base_weight() + layer.delta_weight()).double().numpy()
            assert np.abs(w - want).max() <= 1e-6 * np.abs(want).max(), name
            with torch.no_grad():
                loaded.get_submodule(f"model.layers.{i}.{slot.hf}").weight.copy_(torch.from_numpy(w))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


# ------------------------------------------------------------------------------------ LLaMA-3 rotary scaling
def test_llama3_rope_scaling_writes_rope_freqs(tmp_path, ids):
    """rope_freqs holds the factor llama.cpp divides each frequency by: transformers' default inverse
    frequencies over its llama3-scaled ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model, tokenizer = tiny("llama", seed=4, rope_parameters=rope)
    qbara.prepare(model, INT4_G32)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", embedding_type="f32")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    freqs = np.asarray(gguf_tensors(tmp_path / "m.gguf")["rope_freqs.weight"].data)
    assert freqs.dtype == np.float32 and freqs.shape == (8,)
    assert freqs.min() == 1.0 and freqs.max() == 8.0 and ((freqs > 1.0) & (freqs < 8.0)).any()  # all three regimes
    np.testing.assert_allclose(freqs, (base / scaled).numpy(), rtol=1e-5)
    # transformers' reader skips rope_freqs (no HF parameter): told the scaling, it gives the model's logits
    loaded = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32,
                                                    rope_parameters=rope).eval()
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("arch, overrides, match", [
    ("gemma3", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256.*1/sqrt\\(16\\)"),
    ("gemma3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("qwen3", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "rope scaling 'linear'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "sliding-window"),
    ("llama", {"hidden_act": "gelu"}, "activation 'gelu'"),
])
def test_what_llama_cpp_would_not_reproduce_is_refused(arch, overrides, match, tmp_path):
    model, tokenizer = tiny(arch, **overrides)
    qbara.prepare(model, INT4_G32)
    with pytest.raises(QbaraError, match=match + ".*export_hf"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_untied_gemma3_output_is_refused(tmp_path):
    model, tokenizer = tiny("gemma3", tie_word_embeddings=False)
    qbara.prepare(model, INT4_G32)
    with pytest.raises(QbaraError, match="lm_head is not tied.*gemma3"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")


# ------------------------------------------------------------------------------------ INT5 G32 -> Q5_1
@pytest.mark.parametrize("arch", ARCHS)
def test_folded_int5_layers_go_out_as_q5_1_bit_for_bit(arch, tmp_path, ids):
    model, tokenizer = quantized(arch, AdapterConfig("qahira", rank=4, alpha=8), QuantConfig("int5", block_size=32),
                                 seed=5)
    qbara.merge(model, into="quantized")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", embedding_type="f32")
    assert report.lossless and len(report.exact_q5_1) == 2 * len(ARCHITECTURES[arch].linears)
    tensors = gguf_tensors(tmp_path / "m.gguf")
    for i, layer in enumerate(model.model.layers):
        for slot in ARCHITECTURES[arch].linears:
            t = tensors[f"blk.{i}.{slot.gguf}.weight"]
            assert t.tensor_type == GGMLQuantizationType.Q5_1
            got = to_hf_rows(dequantize(t.data, t.tensor_type), arch, slot.gguf, model.config)
            assert np.array_equal(got, layer.get_submodule(slot.hf).dequantize(torch.float32).numpy())
    with torch.no_grad():
        ref, got = model(ids).logits, load_back(tmp_path / "m.gguf", arch)(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


# ------------------------------------------------------------------------------------ per-architecture metadata
def test_sliding_window_that_llama_cpp_does_not_slide_caps_the_context(tmp_path):
    """llama.cpp runs Mistral with full attention: the file claims no longer context than the window, within
    which both attend alike."""
    model, tokenizer = tiny("mistral", sliding_window=64)
    qbara.prepare(model, INT4_G32)
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert gguf_fields(tmp_path / "m.gguf")["llama.context_length"] == 64


def test_gemma3_linear_rope_scaling_of_global_layers(tmp_path):
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    model, tokenizer = tiny("gemma3", rope_parameters=rope)
    qbara.prepare(model, INT4_G32)
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    fields = gguf_fields(tmp_path / "m.gguf")
    assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 8.0
    assert fields["gemma3.rope.freq_base"] == 1e6


def test_llama_linear_rope_scaling_is_written_as_the_converter_does(tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model, tokenizer = tiny("llama", rope_parameters=rope)
    qbara.prepare(model, INT4_G32)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", embedding_type="f32")
    fields = gguf_fields(tmp_path / "m.gguf")
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 2.0
    assert "rope_freqs.weight" not in gguf_tensors(tmp_path / "m.gguf")


def test_phi3_longrope_writes_both_factor_tensors_and_the_attention_factor(tmp_path, ids):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    gen = torch.Generator().manual_seed(6)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 512,
            "long_factor": (1 + 3 * torch.rand(8, generator=gen)).tolist(),
            "short_factor": (1 + 0.2 * torch.rand(8, generator=gen)).tolist()}
    model, tokenizer = tiny("phi3", rope_parameters=rope, original_max_position_embeddings=512)
    qbara.prepare(model, INT4_G32)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", embedding_type="f32")
    tensors, fields = gguf_tensors(tmp_path / "m.gguf"), gguf_fields(tmp_path / "m.gguf")
    for kind in ("long", "short"):
        t = tensors[f"rope_factors_{kind}.weight"]
        assert t.tensor_type == GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(t.data), np.asarray(rope[f"{kind}_factor"], dtype=np.float32))
    _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](model.config, "cpu", seq_len=4096)
    assert attention_factor > 1 and fields["phi3.rope.scaling.attn_factor"] == pytest.approx(attention_factor)
    assert fields["phi3.rope.scaling.original_context_length"] == 512
    loaded = T.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32,
                                                    rope_parameters=rope, original_max_position_embeddings=512).eval()
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
