import pytest
import torch
from torch import nn

from qbara import AdapterConfig, QbaraError, QuantConfig, load_model, merge, prepare
from qbara.models import tiny_llama
from qbara.models.gptq import gptq_calibration, gptq_quantize_model
from qbara.models.tiny import tiny_qwen2
from qbara.native import save_quantized
from qbara.nn import QuantizedLinear
from qbara.preparation import gptq_prepare
from qbara.quant.gptq import gptq_quantize, hessian_accumulate
from tests.helpers import randomize_adapters

CONFIG = QuantConfig("int3", 32)


def _calibration(tokenizer, n=12, length=48):
    return gptq_calibration(tokenizer, n, length)


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: m.qweight.dequantize() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _layer_by_layer_reference(model, config, sequences, batch_size):
    """GPTQ done the slow, obvious way: for each decoder layer, run the whole model (earlier layers already
    quantized) on the calibration batches with hooks on this layer's linears, then quantize them."""
    from qbara.targets import set_submodule

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            linears = {f"model.layers.{i}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            sums = {n: (None, 0) for n in linears}
            hooks = [m.register_forward_hook(lambda mod, args, out, n=n, sums=sums: sums.__setitem__(
                n, hessian_accumulate(*sums[n], args[0]))) for n, m in linears.items()]
            for start in range(0, len(sequences), batch_size):
                model(input_ids=sequences[start:start + batch_size], use_cache=False)
            for h in hooks:
                h.remove()
            for n, m in linears.items():
                set_submodule(model, n, QuantizedLinear(gptq_quantize(m.weight, sums[n][0], config), m.bias))
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_sequential_gptq_matches_the_layer_by_layer_reference(build):
    """Layer i's Hessians come from the outputs of the *quantized* layers before it, exactly as a full forward
    of the partly quantized model gives them (q/k/v sharing one Hessian changes nothing)."""
    model, tokenizer = build()
    sequences = _calibration(tokenizer)
    reference = _layer_by_layer_reference(build()[0], CONFIG, sequences, batch_size=4)
    gptq_quantize_model(model, CONFIG, sequences, batch_size=4, progress=False)
    ours, theirs = _codes(model), _codes(reference)
    assert len(ours) == 14 and ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)
    report = model.qbara.gptq
    assert report.settings["tokens"] == sequences.numel() and report.error_ratio < 0.8
    assert all(v["gptq_error"] < v["rtn_error"] for v in report.layers.values())


def test_gptq_model_saves_loads_and_takes_a_lora_adapter(tmp_path):
    model, tokenizer = tiny_llama()
    dense = tiny_llama()[0]
    gptq_quantize_model(model, CONFIG, _calibration(tokenizer), progress=False)
    ids = torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tokenizer, tmp_path / "gptq")
    loaded, _ = load_model(str(tmp_path / "gptq"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    fingerprint = model.qbara.base_fingerprint
    # LoRA on top: prepare attaches only (the GPTQ weights stay), on the in-memory model and on the loaded folder
    for base in (model, loaded):
        prepare(base, CONFIG, AdapterConfig("lora", rank=4))
        trainable = [n for n, p in base.named_parameters() if p.requires_grad]
        assert trainable and all("lora" in n for n in trainable)
        with torch.no_grad():
            assert torch.equal(base(ids).logits, expected)  # B = 0 at step 0
    assert loaded.qbara.base_fingerprint == fingerprint  # the adapter is tied to the GPTQ base
    with pytest.raises(QbaraError, match="already quantized as int3-g32, not int4-g32"):
        prepare(load_model(str(tmp_path / "gptq"))[0], QuantConfig("int4", 32), AdapterConfig("lora", rank=4))
    # GPTQ's weights differ from plain round-to-nearest of the dense model
    rtn = prepare(dense, CONFIG)
    assert not torch.equal(rtn.model.layers[1].mlp.down_proj.codes, loaded.model.layers[1].mlp.down_proj.base.codes)


def test_gptq_prepare_and_an_exact_merge_into_the_gptq_base():
    """gptq_prepare = calibration + GPTQ + adapters; a QA-HiRA adapter then folds into the GPTQ INT base."""
    model, tokenizer = tiny_llama()
    gptq_prepare(model, tokenizer, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4), samples=8, length=32,
                 progress=False)
    randomize_adapters(model, std=0.01)
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        merge(model, into="quantized")
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-3, atol=1e-3)
    with pytest.raises(QbaraError, match="init='default' on a GPTQ base"):
        gptq_prepare(tiny_llama()[0], tokenizer, CONFIG, AdapterConfig("lora", rank=4, init="loftq"))


@pytest.mark.parametrize("quant, match", [
    (QuantConfig("nf4"), "INT formats with 1 x G groups"),
    (QuantConfig("int4", 32, block_rows=2), "INT formats with 1 x G groups"),
])
def test_refuses_formats_gptq_cannot_produce(quant, match):
    model, tokenizer = tiny_llama()
    with pytest.raises(QbaraError, match=match):
        gptq_quantize_model(model, quant, _calibration(tokenizer, 2, 16), progress=False)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # refused before any change


def test_refuses_empty_calibration_and_bad_batch():
    model, tokenizer = tiny_llama()
    with pytest.raises(QbaraError, match="calibration sequences"):
        gptq_quantize_model(model, CONFIG, [], progress=False)
    with pytest.raises(QbaraError, match="batch_size"):
        gptq_quantize_model(model, CONFIG, _calibration(tokenizer, 2, 16), batch_size=0, progress=False)


def test_calibration_leaves_out_the_evaluation_play():
    _, tokenizer = tiny_llama()
    sequences = gptq_calibration(tokenizer, 4, 20, plays=("hamlet", "macbeth"), exclude=("Hamlet",))
    assert sequences.shape == (4, 20)
    with pytest.raises(QbaraError, match="no calibration play left"):
        gptq_calibration(tokenizer, 4, 20, plays=("hamlet",), exclude=("hamlet",))


def test_gptq_int4_g32_base_exports_to_gguf_q4_1_exactly(tmp_path):
    """The GPTQ layers are the Q4_1 layout: a merged QA-HiRA fine-tune on them ships losslessly as GGUF."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    from qbara.export import export_gguf

    model, tokenizer = tiny_llama()
    gptq_prepare(model, tokenizer, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4), samples=8, length=32,
                 progress=False)
    randomize_adapters(model, std=0.01)
    merge(model, into="quantized")
    report = export_gguf(model, tokenizer, tmp_path / "gptq.gguf")
    assert report.lossless
    tensor = {t.name: t for t in GGUFReader(str(tmp_path / "gptq.gguf")).tensors}["blk.1.ffn_down.weight"]
    assert tensor.tensor_type == GGMLQuantizationType.Q4_1
    want = model.model.layers[1].mlp.down_proj.dequantize().numpy()
    assert np.array_equal(dequantize(tensor.data, GGMLQuantizationType.Q4_1), want)
