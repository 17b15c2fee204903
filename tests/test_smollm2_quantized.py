"""Integration: the embedded SmolLM2 quantized to NF4 (QLoRA's default) loads, runs, and keeps its perplexity."""
import pytest
import torch

from qbara import QuantConfig, quantize_model
from qbara.commands.quantize import model_bytes, weight_error
from qbara.data import shakespeare_text
from qbara.eval import perplexity
from qbara.nn import QuantizedLinear


@pytest.mark.slow
def test_smollm2_nf4_perplexity_is_reported_and_close_to_fp32(smollm2, smollm2_fresh):
    dense, tokenizer = smollm2
    model, _ = smollm2_fresh
    ids = tokenizer(shakespeare_text("hamlet"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    ref = perplexity(dense, ids, window=256, max_tokens=1024, progress=False)
    quantize_model(model, QuantConfig("nf4"))
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 30 * 7
    bits, rel = weight_error(dense, model)
    result = perplexity(model, ids, window=256, max_tokens=1024, progress=False)
    print(f"SmolLM2 Hamlet ppl (window 256, {result.tokens} tokens): fp32 {ref.ppl:.3f}, "
          f"NF4 {result.ppl:.3f}; NF4 bits/param {bits:.3f}, rel. weight error {rel:.4f}")
    assert bits == pytest.approx(4.127, abs=0.005)
    assert 0.05 < rel < 0.15
    assert model_bytes(model) < 0.5 * model_bytes(dense)
    assert torch.isfinite(torch.tensor(result.ppl))
    # 4-bit NF costs a little perplexity, never a collapse.
    assert ref.ppl < result.ppl < 1.5 * ref.ppl
