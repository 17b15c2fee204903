"""LoRA adapter GGUF (llama.cpp `--lora`): a base + adapter pair applied as llama.cpp does reproduces the model."""
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

import qbara
from qbara import AdapterConfig, QbaraError, QuantConfig
from qbara.export import export_gguf, export_gguf_lora
from qbara.export.gguf import LINEARS, llama_rope_permutation
from qbara.models import tiny_llama

from .conftest import TINY, tiny_adapted, tiny_olmo

GGUF_NAMES = dict(LINEARS)


def unpermute_rows(rows, n_head):
    out = np.empty_like(rows)
    out[llama_rope_permutation(rows.shape[0], n_head).numpy()] = rows
    return out


def applied_weights(base_path, adapter_path, config, user_scale=1.0):
    """HF name -> W + scale · B A per linear, computed from the two files the way llama.cpp's
    build_lora_mm does (scale = user scale · alpha / rank, rank = lora_b's ne[0]), rows put back in HF order."""
    base = {t.name: t for t in GGUFReader(str(base_path)).tensors}
    reader = GGUFReader(str(adapter_path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = float(fields["adapter.lora.alpha"])
    lora = {t.name: np.asarray(t.data) for t in reader.tensors}
    out = {}
    for i in range(config.num_hidden_layers):
        for sub, gguf_name in LINEARS:
            name = f"blk.{i}.{gguf_name}.weight"
            t = base[name]
            w = dequantize(t.data, t.tensor_type).astype(np.float64)
            a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
            assert a.shape[1] == w.shape[1] and b.shape[0] == w.shape[0] and a.shape[0] == b.shape[1]
            scale = user_scale * alpha / b.shape[1] if alpha else user_scale
            w = w + scale * (b.astype(np.float64) @ a.astype(np.float64))
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name)
            out[f"model.layers.{i}.{sub}"] = unpermute_rows(w, heads) if heads else w
    return out, alpha


def dense_model(weights, like, seed, **shape):
    """A dense tiny llama with the given linear weights, and `like`'s embeddings, norms and lm_head."""
    model, _ = tiny_llama(seed=seed, **shape)
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.rsplit(".", 1)[0]
            param.copy_(torch.from_numpy(weights[module]) if module in weights else like.get_parameter(name))
    return model.eval()


def assert_weights_match(model, weights):
    """Every applied weight equals the adapter model's base + ΔW (relative 1e-6)."""
    for name, w in weights.items():
        layer = model.get_submodule(name)
        want = (layer.base_weight() + layer.delta_weight()).double().numpy()
        assert np.abs(w - want).max() <= 1e-6 * np.abs(want).max(), name


def assert_logits_match(model, weights, ids_shape, ids_seed, seed, **shape):
    """A dense model built from the applied weights gives the adapter model's logits (relative 1e-5)."""
    ids = torch.randint(0, 256, ids_shape, generator=torch.Generator().manual_seed(ids_seed))
    dense = dense_model(weights, model, seed=seed, **shape)
    with torch.no_grad():
        ref, got = model(ids).logits, dense(ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A LoRA (rank 4, alpha 8) model on an INT4 G32 base, one layer with its own scaling; the base and
    adapter GGUFs written from it."""
    model, tokenizer = tiny_adapted(seed=5, adapter=AdapterConfig("lora", rank=4, alpha=8))
    model.model.layers[1].mlp.down_proj.scaling = 0.75  # another s: folded into that layer's lora_b
    root = tmp_path_factory.mktemp("lora")
    base = export_gguf(model, tokenizer, root / "base.gguf", separate_lora=True, embedding_type="f32",
                       base_model="tiny-llama")
    adapter = export_gguf_lora(model, root / "adapter.gguf", base_model="tiny-llama", adapter="runs/lora")
    return model, base, adapter


def test_base_is_written_without_the_adapters(pair):
    model, base, _ = pair
    assert base.lossless and base.adapters_separate == 14 and base.adapters_merged == 0
    assert "left 14 plain LoRA adapter layers out" in base.summary()
    assert qbara.adapters.adapter_layers(model)  # the model keeps its adapters
    tensors = {t.name: t for t in GGUFReader(str(base.path)).tensors}
    t = tensors["blk.0.ffn_up.weight"]
    want = model.model.layers[0].mlp.up_proj.base.dequantize().numpy()
    assert np.array_equal(dequantize(t.data, t.tensor_type), want)


def test_adapter_tensors_names_shapes_and_metadata(pair):
    model, _, adapter = pair
    reader = GGUFReader(str(adapter.path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)  # s · r = (8 / 4) · 4
    assert adapter.alpha == pytest.approx(8.0) and set(adapter.ranks.values()) == {4}
    assert adapter.rescaled == ["model.layers.1.mlp.down_proj"]
    assert fields["general.quantized_by"] == "qbara" and fields["general.base_model.0.name"] == "tiny-llama"
    assert "runs/lora" in fields["general.description"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 28 and all(t.tensor_type.name == "F32" for t in tensors.values())
    layer = model.model.layers[0].self_attn.k_proj
    a, b = tensors["blk.0.attn_k.weight.lora_a"], tensors["blk.0.attn_k.weight.lora_b"]
    assert list(a.shape) == [64, 4] and list(b.shape) == [4, 32]  # GGUF ne: a [d_in, r], b [r, d_out]
    assert np.array_equal(np.asarray(a.data), layer.lora_A.weight.detach().numpy())
    # B's rows are output rows: permuted for llama.cpp's rotary layout as the base's k rows are
    assert np.array_equal(unpermute_rows(np.asarray(b.data), 2), layer.lora_B.weight.detach().numpy())
    assert not np.array_equal(np.asarray(b.data), layer.lora_B.weight.detach().numpy())
    v = model.model.layers[0].self_attn.v_proj
    assert np.array_equal(np.asarray(tensors["blk.0.attn_v.weight.lora_b"].data), v.lora_B.weight.detach().numpy())


def test_pair_applied_as_llama_cpp_does_reproduces_the_model(pair):
    model, base, adapter = pair
    weights, _ = applied_weights(base.path, adapter.path, model.config)
    assert_weights_match(model, weights)
    assert_logits_match(model, weights, (2, 32), ids_seed=7, seed=5, **TINY)


def test_f16_adapter_holds_the_factors_rounded_to_fp16(pair, tmp_path):
    """dtype='f16': every tensor F16 (half the bytes), each value the fp16 nearest the F32 file's, and the pair
    applied as llama.cpp does is the model up to that rounding."""
    model, base, f32 = pair
    f16 = export_gguf_lora(model, tmp_path / "adapter16.gguf", dtype="f16")
    reader = GGUFReader(str(f16.path))
    halves = {t.name: t for t in reader.tensors}
    assert all(t.tensor_type.name == "F16" for t in halves.values()) and f16.dtype == "f16"
    assert reader.fields["general.file_type"].contents() == 1  # MOSTLY_F16
    for t in GGUFReader(str(f32.path)).tensors:
        want = np.asarray(t.data).astype(np.float16)
        assert np.array_equal(np.asarray(halves[t.name].data), want), t.name
    tensor_bytes = sum(int(t.n_bytes) for t in halves.values())
    assert tensor_bytes * 2 == sum(int(t.n_bytes) for t in GGUFReader(str(f32.path)).tensors)
    weights, _ = applied_weights(base.path, f16.path, model.config)
    for name, w in weights.items():
        layer = model.get_submodule(name)
        delta = layer.delta_weight().double().numpy()
        err = np.abs(w - (layer.base_weight().double().numpy() + delta)).max()
        assert 0 < err <= 2e-3 * np.abs(delta).max(), name  # fp16's 2^-11 relative rounding, through B A


def test_f16_adapter_refuses_values_beyond_fp16(tmp_path):
    model, _ = tiny_adapted(seed=6, adapter=AdapterConfig("lora", rank=4, alpha=8))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_A.weight[0, 0] = 1e5
    with pytest.raises(QbaraError, match="beyond fp16's range.*f32"):
        export_gguf_lora(model, tmp_path / "a.gguf", dtype="f16")
    with pytest.raises(QbaraError, match="f32 or f16"):
        export_gguf_lora(model, tmp_path / "b.gguf", dtype="bf16")


def test_gguf_base_with_lora(tmp_path):
    """LoRA on a gguf:q4_k base (what an LQ-LoRA / LoftQ fine-tune on K-quants gives): its base goes
    out as its own blocks, the adapter beside it."""
    shape = {"hidden": 256, "layers": 1, "heads": 4, "kv_heads": 2, "intermediate": 256}
    model, tokenizer = tiny_llama(seed=6, **shape)
    qbara.prepare(model, QuantConfig("gguf:q4_0"), AdapterConfig("lora", rank=2, alpha=2))
    from tests.helpers import randomize_adapters

    randomize_adapters(model, 6)
    base = export_gguf(model, tokenizer, tmp_path / "b.gguf", separate_lora=True, embedding_type="f32")
    adapter = export_gguf_lora(model, tmp_path / "a.gguf")
    assert base.format_counts == {"Q4_0": 7} and base.lossless
    weights, alpha = applied_weights(base.path, adapter.path, model.config)
    assert alpha == 2.0
    assert_weights_match(model, weights)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("adapter", [AdapterConfig("qbara", rank=2, pool=2), AdapterConfig("qalora", rank=2),
                                     AdapterConfig("qahira", rank=2)], ids=lambda a: a.method)
def test_pooled_adapters_are_refused_with_the_fix(adapter, tmp_path):
    model, _ = tiny_adapted(adapter=adapter)
    with pytest.raises(QbaraError, match=rf"{adapter.method} .*not plain LoRA.*qbara.merge\(model, "
                                         rf"into='quantized'\)"):
        export_gguf_lora(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_model_without_adapters_is_refused(tmp_path):
    model, _ = tiny_adapted()
    with pytest.raises(QbaraError, match="no adapters.*export_gguf"):
        export_gguf_lora(model, tmp_path / "a.gguf")


def test_unsupported_architecture_is_refused(tmp_path):
    model = tiny_olmo()
    qbara.prepare(model, QuantConfig("int4", 32), AdapterConfig("lora", rank=2))
    with pytest.raises(QbaraError, match="supports the architectures.*qwen3.*'olmo'.*export_hf"):
        export_gguf_lora(model, tmp_path / "a.gguf")


def test_lora_on_lm_head_is_refused(tmp_path):
    from qbara.adapters.lora import LoRALinear

    model, _ = tiny_adapted(adapter=AdapterConfig("lora", rank=2))
    model.lm_head = LoRALinear(model.lm_head, rank=2, scaling=1.0, name="lm_head")
    with pytest.raises(QbaraError, match="lm_head have no place in a llama.cpp LoRA GGUF"):
        export_gguf_lora(model, tmp_path / "a.gguf")


def test_merging_export_points_to_the_separate_adapter(tmp_path):
    model, tokenizer = tiny_adapted(adapter=AdapterConfig("lora", rank=4, alpha=8))
    with pytest.raises(QbaraError, match="separate_lora=True.*export_gguf_lora"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")


def test_lq_lora_over_gguf_formats_exports_as_base_and_adapter(tmp_path):
    """LQ-LoRA end to end for llama.cpp: the ILP picks GGML formats per matrix under a file budget, W ≈ Q + L1 L2
    with Q in those formats; the mixed base and the LoRA adapter read back and applied as llama.cpp does give the
    step-0 model's weights and logits."""
    from qbara.lq import gguf_configs

    shape = {"hidden": 256, "layers": 1, "heads": 4, "kv_heads": 2, "intermediate": 512}
    model, tokenizer = tiny_llama(seed=8, **shape)
    qbara.lq_prepare(model, 6.5, 4, configs=gguf_configs(["q2_k", "q4_0", "q4_k", "q6_k", "q8_0"]),
                     file_budget=True, table_iters=2, max_iters=2, progress=False)
    assert model.qbara.lq.allocation.file_bits_per_param <= 6.5
    base = export_gguf(model, tokenizer, tmp_path / "b.gguf", separate_lora=True, embedding_type="q8_0")
    adapter = export_gguf_lora(model, tmp_path / "a.gguf")
    assert base.lossless and sum(base.format_counts.values()) == 7
    weights, _ = applied_weights(base.path, adapter.path, model.config)
    assert_weights_match(model, weights)
    assert_logits_match(model, weights, (2, 16), ids_seed=9, seed=8, **shape)
