"""Issue #26, adapter records: the recorded quant must be the base's, an edited record is refused, a
qbara_adapter.json of any kind makes a qbara folder, and adapter tensors are never rounded on load."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from qbara import AdapterConfig, QbaraError, QuantConfig, load_adapter, prepare, save_adapter
from qbara.adapters import adapter_layers
from qbara.models import tiny_llama
from qbara.models.loader import load_model
from qbara.pretrained import from_pretrained

from .conftest import INT4, NF4, build, randomize_adapters

IDS = torch.tensor([[1, 7, 42, 3, 9, 100]])
LAYER = "model.layers.0.self_attn.q_proj"
KEY = f"base_model.model.{LAYER}.lora_A.weight"


@pytest.fixture
def int4_adapter(tmp_path):
    """A LoRA adapter trained on tiny-llama quantized as INT4 G32, saved with random weights."""
    model, _ = tiny_llama(seed=0)
    prepare(model, INT4, AdapterConfig("lora", rank=4, alpha=8))
    randomize_adapters(model, seed=3)
    return save_adapter(model, tmp_path / "adapter")


def _edit_record(folder, edit):
    path = folder / "qbara_adapter.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _without_saved_record(folder):
    """The folder as qbara before the record copy wrote it: the same tensors, no `qbara_record` metadata."""
    path = folder / "adapter_model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------- 1. recorded quant vs the base's


def test_adapter_for_int4_is_refused_on_an_nf4_base_naming_layer_both_quants_and_fix(int4_adapter):
    base, _ = load_model("tiny-llama", quant=NF4)  # the same dense weights, quantized otherwise
    with pytest.raises(QbaraError) as err:
        load_adapter(base, int4_adapter)
    message = str(err.value)
    assert message.startswith(f"{LAYER}: the adapter in ")
    assert "quantized as int4-g32" in message and "quantized as nf4-b32" in message
    assert "from_pretrained(model, adapter=folder)" in message
    assert not adapter_layers(base)  # nothing attached


def test_adapter_is_refused_on_a_base_quantized_with_another_block_size(int4_adapter):
    base, _ = load_model("tiny-llama", quant=QuantConfig("int4", block_size=64))
    with pytest.raises(QbaraError, match="quantized as int4-g32, but this base has it quantized as int4-g64"):
        load_adapter(base, int4_adapter)


def test_adapter_trained_on_a_dense_layer_is_refused_on_a_quantized_one(int4_adapter):
    _without_saved_record(int4_adapter)  # (with the copy, the edit below is refused as an edit)
    _edit_record(int4_adapter, lambda r: r["layers"][LAYER].update(quant=None))
    base, _ = load_model("tiny-llama", quant=INT4)
    with pytest.raises(QbaraError, match=f"{LAYER}: .* trained on this layer dense \\(not quantized\\), but this "
                                         f"base has it quantized as int4-g32"):
        load_adapter(base, int4_adapter)


@torch.no_grad()
def test_matching_quantized_and_dense_bases_still_load_alike(int4_adapter):
    quantized, _ = load_model("tiny-llama", quant=INT4)
    load_adapter(quantized, int4_adapter)
    dense, _ = tiny_llama(seed=0)
    load_adapter(dense, int4_adapter)  # quantized on load as recorded
    assert torch.equal(quantized(IDS).logits, dense(IDS).logits)


# ---------------------------------------------------------------- 2. an edited record is refused


def test_edited_layer_quant_is_refused_before_the_base_is_quantized(int4_adapter):
    _edit_record(int4_adapter, lambda r: r["layers"][LAYER].update(quant=NF4.to_dict()))
    with pytest.raises(QbaraError) as err:
        from_pretrained("tiny-llama", adapter=int4_adapter)
    message = str(err.value)
    assert message.startswith(f"{int4_adapter / 'qbara_adapter.json'}: layers.{LAYER}.quant is ")
    assert "'format': 'nf4'" in message and "saved with {" in message and "'format': 'int4'" in message
    assert "edited after saving" in message and "save the adapter again" in message
    with pytest.raises(QbaraError, match="edited after saving"):
        load_adapter(tiny_llama(seed=0)[0], int4_adapter)


@pytest.mark.parametrize("edit,entry", [
    (lambda r: r["adapter"].update(alpha=32), "adapter.alpha"),
    (lambda r: r.update(base_fingerprint="0" * 16), "base_fingerprint"),
    (lambda r: r["layers"][LAYER].update(extra=1), f"layers.{LAYER}.extra"),
])
def test_any_edited_entry_is_named(int4_adapter, edit, entry):
    _edit_record(int4_adapter, edit)
    with pytest.raises(QbaraError, match=f"qbara_adapter.json: {entry} is "):
        load_adapter(tiny_llama(seed=0)[0], int4_adapter)


def test_reformatted_but_equal_record_loads(int4_adapter):
    path = int4_adapter / "qbara_adapter.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=7, sort_keys=False))
    load_adapter(tiny_llama(seed=0)[0], int4_adapter)


@torch.no_grad()
def test_folder_of_earlier_versions_without_the_saved_record_still_loads(int4_adapter):
    expected, _ = tiny_llama(seed=0)
    load_adapter(expected, int4_adapter)
    _without_saved_record(int4_adapter)
    record = json.loads((int4_adapter / "qbara_adapter.json").read_text())
    assert record["format_version"] == 1  # the record itself did not change form
    model, _ = from_pretrained("tiny-llama", adapter=int4_adapter)
    assert torch.equal(model(IDS).logits, expected(IDS).logits)


# ---------------------------------------------------------------- 3. qbara_adapter.json of any kind


def _replace_record(folder, kind):
    path = folder / "qbara_adapter.json"
    path.unlink()
    if kind == "folder":
        path.mkdir()
    elif kind == "devnull":
        path.symlink_to("/dev/null")
    elif kind == "dangling":
        path.symlink_to(folder / "nowhere.json")
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("kind,message", [("folder", "is a folder"), ("devnull", "not a regular file"),
                                          ("fifo", "not a regular file"), ("dangling", "cannot read")])
def test_record_that_is_not_a_regular_file_is_refused_not_read_as_peft(int4_adapter, kind, message, recwarn):
    _replace_record(int4_adapter, kind)
    for load in (lambda: load_adapter(tiny_llama(seed=0)[0], int4_adapter),
                 lambda: from_pretrained("tiny-llama", adapter=int4_adapter)):
        with pytest.raises(QbaraError) as err:
            load()
        assert str(err.value).startswith(str(int4_adapter / "qbara_adapter.json"))
        assert message in str(err.value)
    assert not [w for w in recwarn if "PEFT" in str(w.message)]


# ---------------------------------------------------------------- 4. dtypes: exact widening only


def _retype(folder, dtype):
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    state[KEY] = state[KEY].to(dtype)
    save_file(state, str(path), metadata={"format": "pt"})
    _edit_record(folder, lambda r: r.pop("weights_sha256"))  # the digest covers dtypes: as a hand-made folder


@pytest.mark.parametrize("dtype", [torch.float64])
def test_adapter_tensor_that_would_round_is_refused_naming_tensor_dtype_and_fix(tmp_path, dtype):
    model, _ = build("tiny-llama", "lora")
    randomize_adapters(model, seed=5)
    folder = save_adapter(model, tmp_path / "adapter")
    _retype(folder, dtype)
    with pytest.raises(QbaraError) as err:
        load_adapter(tiny_llama(seed=0)[0], folder)
    assert str(err.value) == (f"{folder / 'adapter_model.safetensors'}: {KEY}: dtype {dtype}, but the adapter "
                              f"parameter is torch.float32 and {dtype} does not convert to it exactly; save the "
                              f"adapter in torch.float32 (or float16 / bfloat16, widened exactly)")


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapter_tensor_is_widened_exactly(tmp_path, dtype):
    model, _ = build("tiny-llama", "lora")
    randomize_adapters(model, seed=5)
    folder = save_adapter(model, tmp_path / "adapter")
    _retype(folder, dtype)
    stored = load_file(str(folder / "adapter_model.safetensors"))[KEY]
    fresh, _ = tiny_llama(seed=0)
    load_adapter(fresh, folder)
    loaded = adapter_layers(fresh)[LAYER].lora_A.weight
    assert loaded.dtype == torch.float32 and torch.equal(loaded, stored.to(torch.float32))
    assert torch.equal(loaded.to(dtype), stored)  # every value kept: the widening loses nothing


# ---------------------------------------------------------------- found by the fuzz pass (bench/fuzz_readers.py)


def test_a_layer_record_without_quant_is_one_error(int4_adapter):
    """adapter-qbara:291: a layer record lacking its 'quant' entry was a KeyError."""
    _edit_record(int4_adapter, lambda r: r["layers"][LAYER].pop("quant"))
    base, _ = load_model("tiny-llama", quant=INT4)
    with pytest.raises(QbaraError, match=f"layer '{LAYER}' has no 'quant' entry"):
        load_adapter(base, int4_adapter)


def test_a_qbara_folder_without_its_record_is_not_read_as_peft(int4_adapter):
    """cli:41: with qbara_adapter.json removed, the folder was read as a PEFT adapter (dense base, no checks)."""
    (int4_adapter / "qbara_adapter.json").unlink()
    base, _ = load_model("tiny-llama", quant=INT4)
    with pytest.raises(QbaraError, match="qbara_adapter.json is missing"):
        load_adapter(base, int4_adapter)
    with pytest.raises(QbaraError, match="qbara_adapter.json is missing"):
        from_pretrained("tiny-llama", adapter=int4_adapter)
