import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

import qbara
from qbara import AdapterConfig, QbaraError, QuantConfig, QuantizedLinear
from qbara.export import export_gguf, llama_rope_permutation
from qbara.export.gguf import LINEARS
from qbara.models import tiny_llama, tiny_qwen2

from .conftest import TINY, tiny_adapted


def gguf_tensors(path):
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def unpermute(weight, n_head):
    """HF row order from llama.cpp's q/k row order."""
    out = np.empty_like(weight)
    out[llama_rope_permutation(weight.shape[0], n_head).numpy()] = weight
    return out


def test_q4_1_tensors_equal_the_merged_weights_exactly(exported):
    model, tensors = exported["model"], gguf_tensors(exported["path"])
    config = model.config
    checked = 0
    for i, layer in enumerate(model.model.layers):
        for sub, gguf_name in LINEARS:
            module = layer.get_submodule(sub)
            assert isinstance(module, QuantizedLinear)
            t = tensors[f"blk.{i}.{gguf_name}.weight"]
            assert t.tensor_type == GGMLQuantizationType.Q4_1
            got = dequantize(t.data, GGMLQuantizationType.Q4_1)  # gguf-py's own Q4_1 reader
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name)
            if heads:
                got = unpermute(got, heads)
            want = module.dequantize(torch.float32).numpy()
            assert got.shape == want.shape
            assert np.array_equal(got, want), f"blk.{i}.{gguf_name}"
            checked += 1
    assert checked == 14
    assert len(exported["report"].exact_q4_1) == 14 and exported["report"].lossless


def test_q_and_k_are_stored_permuted(exported):
    """The q/k rows really are in llama.cpp's rotary order (not just un-permuted twice)."""
    model, tensors = exported["model"], gguf_tensors(exported["path"])
    q = model.model.layers[0].self_attn.q_proj.dequantize().numpy()
    raw = dequantize(tensors["blk.0.attn_q.weight"].data, GGMLQuantizationType.Q4_1)
    half = model.config.head_dim // 2
    assert np.array_equal(raw[1], q[half])  # GGUF row 1 of head 0 is HF row head_dim / 2
    assert not np.array_equal(raw, q)


def test_other_tensors_names_types_and_metadata(exported):
    reader = GGUFReader(str(exported["path"]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = {"token_embd.weight": "Q8_0", "output_norm.weight": "F32", "output.weight": "Q8_0"}
    for i in range(2):
        expected.update({f"blk.{i}.attn_norm.weight": "F32", f"blk.{i}.ffn_norm.weight": "F32"})
        expected.update({f"blk.{i}.{name}.weight": "Q4_1" for _, name in LINEARS})
    assert types == expected
    assert exported["report"].tensor_types == expected
    tensors = {t.name: t for t in reader.tensors}
    model = exported["model"]
    emb = dequantize(tensors["token_embd.weight"].data, GGMLQuantizationType.Q8_0)
    assert np.array_equal(emb, model.model.embed_tokens.weight.numpy())  # on the Q8_0 grid: exact
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_norm.weight"].data),
                          model.model.layers[1].post_attention_layernorm.weight.numpy())
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 3  # MOSTLY_Q4_1
    assert (fields["llama.embedding_length"], fields["llama.block_count"], fields["llama.feed_forward_length"]) \
        == (64, 2, 128)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.vocab_size"] == 260
    assert fields["llama.context_length"] == 2048
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 260
    assert fields["tokenizer.ggml.eos_token_id"] == 256 and fields["tokenizer.ggml.padding_token_id"] == 257
    assert fields["tokenizer.ggml.token_type"][256:] == [3, 3, 3, 3]  # special tokens are CONTROL
    assert "im_start" in fields["tokenizer.chat_template"]


def test_gguf_loads_back_through_transformers_with_matching_logits(exported, ids):
    model, tokenizer = qbara.load_model(str(exported["path"]))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(ids).logits
    ref = exported["adapter_logits"]
    # Against the unmerged adapter model: differs only by the fp16 rounding of the folded minima
    # (measured 7e-4 for this large, ~16% relative, random update).
    assert (logits - ref).abs().max() / ref.abs().max() < 2e-3
    # Against the merged quantized model: the same weights, so float noise only.
    merged = exported["merged_logits"]
    assert (logits - merged).abs().max() / merged.abs().max() < 1e-5
    text = "To be, or not to be <|im_end|> ok"
    assert tokenizer(text).input_ids == exported["tokenizer"](text).input_ids
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == 257
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == \
        exported["tokenizer"].apply_chat_template(chat, tokenize=False)


def test_attached_adapters_are_merged_on_the_fly(exported, tmp_path):
    model, tokenizer = tiny_adapted(adapter=AdapterConfig("qahira", rank=8, alpha=16))
    report = export_gguf(model, tokenizer, tmp_path / "unmerged.gguf")
    assert report.adapters_merged == 14 and report.lossless
    assert qbara.adapters.adapter_layers(model)  # the model passed in keeps its adapters
    assert (tmp_path / "unmerged.gguf").read_bytes() == exported["path"].read_bytes()


def test_qalora_export_is_exact(tmp_path):
    model, tokenizer = tiny_adapted(seed=1, adapter=AdapterConfig("qalora", rank=4, alpha=8))
    qbara.merge(model, into="quantized")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert report.lossless and report.requantize_error == 0.0
    t = gguf_tensors(tmp_path / "m.gguf")["blk.1.ffn_down.weight"]
    want = model.model.layers[1].mlp.down_proj.dequantize().numpy()
    assert np.array_equal(dequantize(t.data, GGMLQuantizationType.Q4_1), want)


def test_tied_embeddings_write_no_output_tensor(tmp_path, ids):
    model, tokenizer = tiny_adapted(tie=True)
    report = export_gguf(model, tokenizer, tmp_path / "tied.gguf")
    assert "output.weight" not in report.tensor_types
    loaded, _ = qbara.load_model(str(tmp_path / "tied.gguf"))
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_embedding_types(tmp_path):
    model, tokenizer = tiny_adapted(snap=False)
    q8 = export_gguf(model, tokenizer, tmp_path / "q8.gguf")
    assert 0 < q8.embedding_error < 1e-2
    f32 = export_gguf(model, tokenizer, tmp_path / "f32.gguf", embedding_type="f32")
    assert f32.embedding_error == 0.0 and f32.tensor_types["token_embd.weight"] == "F32"
    emb = np.asarray(gguf_tensors(tmp_path / "f32.gguf")["token_embd.weight"].data)
    assert np.array_equal(emb, model.model.embed_tokens.weight.numpy())
    f16 = export_gguf(model, tokenizer, tmp_path / "f16.gguf", embedding_type="f16")
    assert f16.tensor_types["output.weight"] == "F16" and 0 < f16.embedding_error < 1e-3
    with pytest.raises(QbaraError, match="embedding_type"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", embedding_type="q4_0")


# ------------------------------------------------------------------------------------------- lossy
@pytest.mark.parametrize("quant", [QuantConfig("nf4", block_size=64), QuantConfig("int4", block_size=64),
                                   QuantConfig("int3", block_size=32),
                                   QuantConfig("int4", block_size=32, minimum_dtype="fp32")], ids=lambda q: q.label)
def test_other_formats_need_lossy_and_report_the_error(quant, tmp_path, ids):
    model, tokenizer = tiny_adapted(quant=quant)
    with pytest.raises(QbaraError, match=r"QuantConfig\('int4', block_size=32\).*--allow-requantize"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", lossy=True)
    assert not report.lossless and len(report.requantized) == 14
    assert 0 < report.max_layer_error and 0 < report.requantize_error <= report.max_layer_error
    assert report.requantize_error < 0.3
    assert "LOSSY" in report.summary()
    loaded, _ = qbara.load_model(str(tmp_path / "m.gguf"))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 0.5  # close, but not exact


def test_dense_model_needs_lossy(tmp_path):
    model, tokenizer = tiny_llama(**TINY)
    with pytest.raises(QbaraError, match="dense"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", lossy=True)
    assert len(report.requantized) == 14 and report.requantize_error > 0


def test_lora_adapter_does_not_fold(tmp_path):
    model, tokenizer = tiny_adapted(adapter=AdapterConfig("lora", rank=4, alpha=8))
    with pytest.raises(QbaraError, match="cannot merge into the quantized base.*--allow-requantize"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", lossy=True)
    assert report.adapters_merged == 14 and len(report.requantized) == 14 and report.requantize_error > 0


# ------------------------------------------------------------------------------------ bad inputs
def test_non_llama_model_is_refused(tmp_path):
    model, tokenizer = tiny_qwen2()
    qbara.prepare(model, QuantConfig("int4", 32))
    with pytest.raises(QbaraError, match="LLaMA.*qwen2.*export_hf"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")


def test_output_paths(exported, tmp_path):
    model, tokenizer = exported["model"], exported["tokenizer"]
    nested = tmp_path / "a" / "b" / "model.gguf"
    report = export_gguf(model, tokenizer, nested)
    assert nested.is_file() and report.path == nested and report.size_bytes == nested.stat().st_size
    assert os.listdir(nested.parent) == ["model.gguf"]  # no temporary file left behind
    export_gguf(model, tokenizer, nested)  # overwrites atomically
    assert os.listdir(nested.parent) == ["model.gguf"]
    with pytest.raises(QbaraError, match=r"\.gguf"):
        export_gguf(model, tokenizer, tmp_path / "model.bin")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(QbaraError, match="directory"):
        export_gguf(model, tokenizer, tmp_path / "dir.gguf")
