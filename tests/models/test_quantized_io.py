import pytest
import torch

from qbara import AdapterConfig, QuantConfig, load_model, merge, prepare
from qbara.models import tiny_llama
from qbara.native import save_quantized
from qbara.nn import QuantizedLinear
from tests.helpers import randomize_adapters


@pytest.mark.parametrize("tie, fmt, minimum_dtype", [(False, "int4", "fp16"), (True, "int4", "fp16"),
                                                     (False, "int4", "fp32"), (False, "int5", "fp16")])
def test_merged_quantized_model_round_trips(tmp_path, tie, fmt, minimum_dtype):
    model, tokenizer = tiny_llama(tie_word_embeddings=tie)
    prepare(model, QuantConfig(fmt, 32, minimum_dtype=minimum_dtype), AdapterConfig("qahira", rank=4))
    randomize_adapters(model, std=0.01)
    merge(model, into="quantized")
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, loaded_tok = load_model(str(tmp_path / "q"))
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 14
    want = torch.float32 if minimum_dtype == "fp32" else torch.float16
    assert all(m.minimum.dtype == want and m.quant_config.format == fmt
               for m in loaded.modules() if isinstance(m, QuantizedLinear))
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
    state = load_file(str(folder / "qbara_model.safetensors"))
    assert f"{LAYER}.scale" in state, sorted(state)[:8]
    damage(state)
    save_file(state, str(folder / "qbara_model.safetensors"))
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
    state = load_file(str(folder / "qbara_model.safetensors"))
    codes = f"{LAYER}.codes"
    state[codes] = torch.randint(0, 256, state[codes].shape, dtype=state[codes].dtype)
    save_file(state, str(folder / "qbara_model.safetensors"))
    with pytest.raises(QbaraError, match="tensors differ from those written"):
        load_model(str(folder))


def test_quantized_manifest_without_layers_is_refused(tmp_path):
    from qbara import QbaraError

    folder = _saved_quantized(tmp_path)
    (folder / "qbara_quant.json").write_text('{"format_version": 1, "layers": {}}')
    with pytest.raises(QbaraError, match="name at least one"):
        load_model(str(folder))


def test_plain_transformers_refuses_a_native_folder_instead_of_loading_random_weights(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    folder = _saved_quantized(tmp_path)
    entry = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"].startswith("qbara (") and "qbara.load_model" in entry["quant_method"]  # issue #26
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)
    (folder / "qbara_quant.json").unlink()  # still known as qbara's by its config.json entry
    from qbara import QbaraError

    with pytest.raises(QbaraError, match="qbara_quant.json is missing"):
        load_model(str(folder))


@pytest.mark.parametrize("stage", ["adapters", "merged", "trainer"])
def test_save_pretrained_of_a_prepared_model_round_trips(stage, tmp_path):
    model, tokenizer = tiny_llama()
    prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))
    randomize_adapters(model, std=0.01)
    if stage == "merged":
        merge(model, into="quantized")
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    if stage == "trainer":  # a plain HF Trainer, as users call it
        from transformers import Trainer, TrainingArguments

        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none",
                                                              use_cpu=True))
        trainer.save_model(str(tmp_path / "saved"))
    else:
        model.save_pretrained(tmp_path / "saved")
    loaded, _ = load_model(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_packed_layers_saved_without_manifest_are_refused(tmp_path):
    """What a plain transformers save_pretrained of a prepared model wrote before qbara handled it."""
    from qbara import QbaraError

    model, tokenizer = tiny_llama()
    prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4))
    plain = type(model).__mro__[1]  # the transformers class under qbara's native-save subclass
    plain.save_pretrained(model, tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(QbaraError, match="packed qbara layers or adapters but no qbara_quant.json"):
        load_model(str(tmp_path / "plain"))


def test_hf_folder_missing_a_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from qbara import QbaraError

    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QbaraError, match="missing.*up_proj.*random weights"):
        load_model(str(tmp_path / "hf"))


def test_bnb_style_double_quant_round_trips(tmp_path):
    """dq_style="bnb" layers keep bitsandbytes' buffers (uint8 scale codes, nested absmax, offset) through a save."""
    import json

    config = QuantConfig("nf4", 64, dq_style="bnb")
    model, tokenizer = tiny_llama()
    prepare(model, config, None)
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tokenizer, tmp_path / "q")
    layers = json.loads((tmp_path / "q" / "qbara_quant.json").read_text())["layers"]
    assert {QuantConfig.from_dict(v) for v in layers.values()} == {config}
    loaded, _ = load_model(str(tmp_path / "q"))
    quantized = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14 and all(m.quant_config == config for m in quantized)
    state, saved = loaded.state_dict(), model.state_dict()
    assert any(k.endswith("nested_absmax") for k in state)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
