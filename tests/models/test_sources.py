"""models.sources: a safetensors folder (streamed) and the same model in memory are one checkpoint to LQ-LoRA and
the GGUF mix: same targets, same weights, same file budget, and the same quantized layers bit for bit."""
import pytest
import torch

from qbara.errors import QbaraError
from qbara.models import tiny_llama
from qbara.models.sources import FolderSource, ModelSource, open_checkpoint
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.targets import linear_layer_names


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tokenizer = tiny_llama(seed=3, hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2)
    folder = tmp_path_factory.mktemp("sources") / "dense"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _both(folder):
    memory, tokenizer = tiny_llama(seed=3, hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2)
    return open_checkpoint(folder), open_checkpoint(memory, tokenizer)


def test_a_folder_and_the_model_in_memory_are_the_same_checkpoint(checkpoint):
    folder, memory = _both(checkpoint)
    assert isinstance(folder, FolderSource) and isinstance(memory, ModelSource)
    names = linear_layer_names(folder.skeleton, "all-linear", include_quantized=False)
    assert names == linear_layer_names(memory.skeleton, "all-linear", include_quantized=False) and len(names) == 7
    streamed, held = folder.weights(names), memory.weights(names)
    for n in names:
        assert torch.equal(streamed[n], held[n]), n
    assert folder.file_budget() == memory.file_budget()
    assert folder.file_budget(embedding_format="q4_k", extra_shapes={"rope_freqs.weight": (32,)}) == \
        memory.file_budget(embedding_format="q4_k", extra_shapes={"rope_freqs.weight": (32,)})


def test_both_quantize_to_the_same_layers(checkpoint):
    """A gguf:* layer rounded under an importance and an NF layer: the streamed model's packed bytes equal the
    in-place quantization's; the folder's dense fingerprint is recorded while streaming."""
    folder, memory = _both(checkpoint)
    layers = {"model.layers.0.self_attn.q_proj": QuantConfig.from_dict({"format": "gguf:q4_k"}),
              "model.layers.0.mlp.down_proj": QuantConfig.from_dict({"format": "nf4", "block_size": 64})}
    importance = {"model.layers.0.self_attn.q_proj": torch.rand(256, generator=torch.Generator().manual_seed(0))}
    assert folder.dense_fingerprint is None
    streamed = folder.quantize(layers, importance, progress=False)
    in_place = memory.quantize(layers, importance, progress=False)
    assert in_place is memory.model and folder.dense_fingerprint is not None
    for n in layers:
        a, b = streamed.get_submodule(n), in_place.get_submodule(n)
        assert isinstance(a, QuantizedLinear) and isinstance(b, QuantizedLinear)
        assert torch.equal(a.dequantize(), b.dequantize()), n
    plain = "model.layers.0.self_attn.k_proj"
    assert not isinstance(in_place.get_submodule(plain), QuantizedLinear)


def test_a_name_with_no_folder_is_loaded_only_when_asked(tmp_path):
    with pytest.raises(QbaraError, match="not a folder of safetensors shards"):
        open_checkpoint("tiny-llama")
    loaded = open_checkpoint("tiny-llama", load=True)
    assert isinstance(loaded, ModelSource) and loaded.tokenizer is not None
    with pytest.raises(QbaraError, match="needs its tokenizer"):
        ModelSource(loaded.model).tokenizer
    with pytest.raises(QbaraError, match="expected a model"):
        open_checkpoint(3)
