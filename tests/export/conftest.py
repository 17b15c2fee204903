import pytest
import torch

from qbara import AdapterConfig, QuantConfig, merge, prepare
from qbara.models import tiny_llama
from qbara.quant.ggml import dequantize_q8_0, quantize_q8_0
from tests.helpers import randomize_adapters  # noqa: F401 (re-exported)

INT4_G32 = QuantConfig("int4", block_size=32)
# Tiny LLaMA: hidden 64, intermediate 128, 4 heads of 16 (2 KV heads), 260-token byte vocabulary:
# every linear's input features are a multiple of 32 (Q4_1 blocks) and so is the embedding's row (Q8_0).
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)


def snap_to_q8_0(model):
    """Put the token embedding and lm_head on their Q8_0 grid, so that writing them as Q8_0 is exact
    and logits of the exported file can be compared tightly."""
    with torch.no_grad():
        for weight in {id(w): w for w in (model.get_input_embeddings().weight,
                                          model.get_output_embeddings().weight)}.values():
            weight.copy_(dequantize_q8_0(quantize_q8_0(weight), tuple(weight.shape)))


def tiny_adapted(seed=0, quant=INT4_G32, adapter=None, tie=False, snap=True):
    """Tiny LLaMA quantized with `quant` and (if given) adapters with random non-zero weights."""
    model, tokenizer = tiny_llama(seed=seed, tie_word_embeddings=tie, **TINY)
    if snap:
        snap_to_q8_0(model)
    prepare(model, quant, adapter)
    if adapter is not None:
        randomize_adapters(model, seed)
    return model, tokenizer


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ids):
    """A tiny QA-HiRA model: its logits before merging, the merged model, and its GGUF export."""
    from qbara.export import export_gguf

    model, tokenizer = tiny_adapted(adapter=AdapterConfig("qahira", rank=8, alpha=16))
    with torch.no_grad():
        adapter_logits = model(ids).logits
    merge(model, into="quantized")
    with torch.no_grad():
        merged_logits = model(ids).logits
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    report = export_gguf(model, tokenizer, path)
    return dict(model=model, tokenizer=tokenizer, path=path, report=report, adapter_logits=adapter_logits,
                merged_logits=merged_logits)


def tiny_olmo():
    """A tiny OLMo: an architecture GGUF export has no table entry for."""
    from transformers import OlmoConfig, OlmoForCausalLM

    config = OlmoConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    return OlmoForCausalLM(config).eval()
