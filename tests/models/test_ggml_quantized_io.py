"""A model whose linears are quantized to a GGML block format (gguf:*) saves and loads as a native folder."""
import torch

from qbara.quant import QuantConfig


def test_quantized_model_saves_and_loads(tmp_path):
    from qbara import load_model, prepare
    from qbara.models import tiny_llama
    from qbara.native import save_quantized
    from qbara.nn import QuantizedLinear

    model, tokenizer = tiny_llama(hidden=256, intermediate=512)
    prepare(model, QuantConfig("gguf:q4_k"), None)
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, _ = load_model(str(tmp_path / "q"))
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.quant_config == QuantConfig("gguf:q4_k") for m in layers)
    state, saved = loaded.state_dict(), model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
