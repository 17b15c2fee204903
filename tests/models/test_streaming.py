"""Quantize on load: identical to load-then-prepare bit for bit, stored in the checkpoint's dtype, streamed."""
import sys

import pytest
import torch

from qbara import AdapterConfig, QbaraError, QuantConfig, load_adapter, load_model, model_fingerprint, prepare
from qbara.models import tiny_llama
from qbara.models.tiny import tiny_qwen2
from qbara.nn import QuantizedLinear
from tests.helpers import TargetReads, mapped_files, randomize_adapters

IDS = torch.tensor([[1, 7, 42, 3, 9, 100, 5]])


def _folder(tmp_path, build=tiny_llama, dtype=torch.bfloat16, shard=None, **kw):
    model, tokenizer = build(seed=0, **kw)
    folder = tmp_path / f"{build.__name__}-{str(dtype)[6:]}-{shard}-{sorted(kw.items())}"
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant,adapter", [(QuantConfig("nf4", 32), AdapterConfig("lora", rank=4)),
                                           (QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))],
                         ids=["nf4-lora", "int4-qahira"])
def test_quantize_on_load_equals_load_then_prepare(build, dtype, quant, adapter, tmp_path):
    folder = _folder(tmp_path, build, dtype)
    eager, _ = load_model(str(folder))
    dense_fingerprint = model_fingerprint(eager)
    prepare(eager, quant, adapter)
    streamed, _ = load_model(str(folder), quant=quant)
    assert streamed.qbara.base_fingerprint == dense_fingerprint
    prepare(streamed, quant, adapter)
    expected, got = eager.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if "lora_" in key or "hira_M" in key:  # adapters: drawn at random, compared below through the logits
            continue
        assert torch.equal(got[key].to(value.dtype), value), key
        packed = "_proj." in key and not key.endswith(".bias")  # quantized buffers: the same as eager
        assert got[key].dtype == (value.dtype if packed else dtype), key  # the rest: the checkpoint's dtype
    for model in (eager, streamed):
        randomize_adapters(model, seed=4)
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, eager(IDS).logits)
    assert streamed(IDS).logits.dtype == torch.float32  # bf16 storage, fp32 compute on CPU


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


@linux_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nothing_of_the_checkpoint_stays_mapped_after_loading(dtype, tmp_path):
    """The kept weights (embeddings, norms, lm_head: the checkpoint's dtype) are the process's own memory, not views
    into the memory-mapped shards: one such view would keep a whole shard mapped and counted in RSS."""
    folder = _folder(tmp_path, tiny_llama, dtype, shard="20KB")
    model, _ = load_model(str(folder), quant=QuantConfig("nf4", 32))
    prepare(model, QuantConfig("nf4", 32), AdapterConfig("lora", rank=4))
    assert mapped_files(folder) == []
    assert model.model.embed_tokens.weight.dtype == dtype  # kept in the checkpoint's dtype, copied once
    eager, _ = load_model(str(folder))
    for name, value in eager.state_dict().items():
        if "_proj" not in name:
            assert torch.equal(model.state_dict()[name], value.to(dtype)), name


def test_sharded_and_tied_checkpoints(tmp_path):
    folder = _folder(tmp_path, tiny_llama, torch.bfloat16, shard="20KB", tie_word_embeddings=True)
    assert (folder / "model.safetensors.index.json").is_file()
    eager, _ = load_model(str(folder))
    prepare(eager, QuantConfig("nf4", 32), None)
    streamed, _ = load_model(str(folder), quant=QuantConfig("nf4", 32))
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, eager(IDS).logits)


def test_adapters_move_between_streamed_and_eager_bases(tmp_path):
    folder = _folder(tmp_path)
    quant, adapter = QuantConfig("int4", 32), AdapterConfig("qahira", rank=4)
    streamed, _ = load_model(str(folder), quant=quant)
    prepare(streamed, quant, adapter)
    randomize_adapters(streamed, seed=1)
    from qbara import save_adapter

    save_adapter(streamed, tmp_path / "adapter")
    eager, _ = load_model(str(folder))
    load_adapter(eager, tmp_path / "adapter")
    again, _ = load_model(str(folder), quant=quant)
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(eager(IDS).logits, streamed(IDS).logits)
        assert torch.equal(again(IDS).logits, streamed(IDS).logits)


def test_at_most_one_target_weight_is_dense_at_a_time(tmp_path, monkeypatch):
    """The streaming contract: each target weight read from the file is gone before the next is read."""
    folder = _folder(tmp_path, tiny_llama, torch.bfloat16, layers=3)
    reads = TargetReads().install(monkeypatch)
    model, _ = load_model(str(folder), quant=QuantConfig("nf4", 32))
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 21
    assert reads.worst == 0  # when each target weight is read, no earlier one is still alive


def test_bad_requests_are_refused(tmp_path):
    folder = _folder(tmp_path)
    model, _ = load_model(str(folder), quant=QuantConfig("nf4", 32))
    with pytest.raises(QbaraError, match="quantized on load with nf4-b32.*same quant"):
        prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))
    (folder / "model.safetensors").rename(folder / "weights.bin")
    with pytest.raises(QbaraError, match="pickle files"):
        load_model(str(folder), quant=QuantConfig("nf4", 32))
    (folder / "weights.bin").unlink()
    with pytest.raises(QbaraError, match="reads safetensors checkpoints and finds none|no weights"):
        load_model(str(folder), quant=QuantConfig("nf4", 32))


def test_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _folder(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QbaraError, match="missing.*up_proj"):
        load_model(str(folder), quant=QuantConfig("nf4", 32))


def test_folder_without_tokenizer_gives_one_clear_error(tmp_path):
    model, _ = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "weights-only")
    for quant in (None, QuantConfig("nf4", 32)):
        with pytest.raises(QbaraError, match="has no tokenizer.*copy the base model's tokenizer"):
            load_model(str(tmp_path / "weights-only"), quant=quant)


def test_gguf_quantize_on_load_equals_dense_load_then_prepare(tmp_path):
    from qbara.export import export_gguf

    model, tokenizer = tiny_llama(seed=0)
    prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", embedding_type="f32").path
    quant = QuantConfig("nf4", 32)
    eager, _ = load_model(str(path))
    fingerprint = model_fingerprint(eager)
    prepare(eager, quant, None)
    streamed, tok = load_model(str(path), quant=quant)
    assert tok is not None and streamed.qbara.base_fingerprint == fingerprint
    expected = eager.state_dict()
    assert all(torch.equal(streamed.state_dict()[k], v) for k, v in expected.items())
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, eager(IDS).logits)
    if sys.platform.startswith("linux"):
        assert mapped_files(tmp_path) == []  # nothing of the GGUF file stays mapped


def test_upcast_output_layer_gives_the_plain_gradients():
    """lm_head stored in bf16, computed in fp32: the same input gradient as an fp32 copy of it would give."""
    from torch import nn

    from qbara.models.streaming import UpcastLinear

    layer = nn.Linear(16, 40, bias=True).to(torch.bfloat16).requires_grad_(False)
    reference = nn.Linear(16, 40, bias=True).requires_grad_(False)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    layer.__class__ = UpcastLinear
    x1 = torch.randn(3, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out1, out2 = layer(x1), reference(x2)
    assert out1.dtype == torch.float32 and torch.equal(out1, out2)
    out1.square().sum().backward()
    out2.square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_a_tensor_of_another_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _folder(tmp_path, tiny_llama, torch.bfloat16)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()  # a norm, not a quantized linear
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QbaraError, match=r"model.norm.weight: shape \(63,\), expected \(64,\)"):
        load_model(str(folder), quant=QuantConfig("nf4", 32))
