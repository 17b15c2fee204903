import pytest
import torch

from qbara import AdapterConfig, QuantConfig, load_model, merge, prepare
from qbara.models import tiny_llama
from qbara.models.quantized_io import save_quantized
from qbara.nn import QuantizedLinear
from tests.helpers import randomize_adapters


@pytest.mark.parametrize("tie, minimum_dtype", [(False, "fp16"), (True, "fp16"), (False, "fp32")])
def test_merged_quantized_model_round_trips(tmp_path, tie, minimum_dtype):
    model, tokenizer = tiny_llama(tie_word_embeddings=tie)
    prepare(model, QuantConfig("int4", 32, minimum_dtype=minimum_dtype), AdapterConfig("qahira", rank=4))
    randomize_adapters(model, std=0.01)
    merge(model, into="quantized")
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, loaded_tok = load_model(str(tmp_path / "q"))
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 14
    want = torch.float32 if minimum_dtype == "fp32" else torch.float16
    assert all(m.minimum.dtype == want for m in loaded.modules() if isinstance(m, QuantizedLinear))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert loaded_tok is not None


def _saved_quantized(tmp_path):
    model, tokenizer = tiny_llama()
    prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))
    merge(model, into="quantized")
    save_quantized(model, tokenizer, tmp_path / "q")
    return tmp_path / "q"


LAYER = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("damage,message", [
    (lambda s: s[f"{LAYER}.scale"].view(-1).__setitem__(0, float("nan")), "NaN or infinite"),
    (lambda s: s[f"{LAYER}.minimum"].view(-1).__setitem__(0, float("inf")), "NaN or infinite"),
    (lambda s: s.__setitem__(f"{LAYER}.scale", s[f"{LAYER}.scale"].float()), "dtype torch.float32, expected torch.float16"),
    (lambda s: s.__setitem__(f"{LAYER}.codes", s[f"{LAYER}.codes"].to(torch.int16)), "dtype torch.int16"),
    (lambda s: s.__setitem__("model.norm.weight", s["model.norm.weight"].to(torch.int64)), "not a float type"),
    (lambda s: s["model.norm.weight"].__setitem__(0, 1e30), "beyond"),
], ids=["nan-scale", "inf-minimum", "fp32-scale", "int16-codes", "int-norm", "huge-norm"])
def test_damaged_quantized_folders_are_refused(damage, message, tmp_path):
    from safetensors.torch import load_file, save_file

    from qbara import QbaraError

    folder = _saved_quantized(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    assert f"{LAYER}.scale" in state, sorted(state)[:8]
    damage(state)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(QbaraError, match="tensors differ from those written"):
        load_model(str(folder))
    _drop_digest(folder)  # a folder without a recorded digest: the value checks still refuse it
    with pytest.raises(QbaraError, match=message):
        load_model(str(folder))


def _drop_digest(folder):
    import json

    manifest = json.loads((folder / "qbara_quant.json").read_text())
    manifest.pop("weights_sha256")
    (folder / "qbara_quant.json").write_text(json.dumps(manifest))


def test_swapped_or_random_codes_are_found_by_the_recorded_digest(tmp_path):
    from safetensors.torch import load_file, save_file

    from qbara import QbaraError

    folder = _saved_quantized(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    codes = f"{LAYER}.codes"
    state[codes] = torch.randint(0, 256, state[codes].shape, dtype=state[codes].dtype)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(QbaraError, match="tensors differ from those written"):
        load_model(str(folder))


def test_quantized_manifest_without_layers_is_refused(tmp_path):
    from qbara import QbaraError

    folder = _saved_quantized(tmp_path)
    (folder / "qbara_quant.json").write_text('{"format_version": 1, "layers": {}}')
    with pytest.raises(QbaraError, match="name at least one"):
        load_model(str(folder))
