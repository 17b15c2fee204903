"""`model.qbara`: the one QbaraState qbara keeps on a model (fingerprint, adapter config, reports)."""
import ast
import copy
import dataclasses
import re
from pathlib import Path

import pytest

import qbara
from qbara import AdapterConfig, QuantConfig, merge, prepare
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.lq import LQConfig
from qbara.models import load_model, tiny_llama
from qbara.models.streaming import dequantize_model, quantize_model
from qbara.nn import QuantizedLinear
from qbara.state import OLD_ATTRIBUTES, QbaraState, state_of
from tests.helpers import randomize_adapters

INT4 = QuantConfig("int4", block_size=32)
QAHIRA = AdapterConfig("qahira", rank=4, alpha=8)
PACKAGE = Path(qbara.__file__).parent
BENCH = PACKAGE.parents[1] / "bench"


def _fields(state: QbaraState) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def test_a_prepared_model_holds_its_state_in_model_qbara():
    model, _ = tiny_llama()
    dense_fingerprint = model_fingerprint(model)
    prepare(model, INT4, QAHIRA)
    assert isinstance(model.qbara, QbaraState) and state_of(model) is model.qbara
    assert model.qbara.base_fingerprint == dense_fingerprint
    assert model.qbara.adapter_config == QAHIRA
    assert model.qbara.loaded_quant is model.qbara.lq is model.qbara.gptq is model.qbara.fold_rounding is None


def test_quantize_on_load_and_lq_set_their_fields():
    loaded, _ = load_model("tiny-llama", quant=INT4)
    assert loaded.qbara.loaded_quant == INT4 and loaded.qbara.base_fingerprint == model_fingerprint(tiny_llama()[0])
    prepare(loaded, INT4, QAHIRA)  # quantized on load: only the adapters are attached
    assert loaded.qbara.adapter_config == QAHIRA and loaded.qbara.loaded_quant == INT4

    model, _ = tiny_llama()
    prepare(model, LQConfig(configs=INT4, method="loftq"), AdapterConfig(rank=4))
    assert model.qbara.lq.method == "loftq" and model.qbara.adapter_config.init == "loftq"
    assert model.qbara.base_fingerprint == model_fingerprint(model)  # of the Q the factors fit


def test_deepcopy_copies_the_state():
    model, _ = tiny_llama()
    prepare(model, INT4, QAHIRA)
    model.qbara.lq = {"report": [1, 2]}
    copied = copy.deepcopy(model)
    assert copied.qbara == model.qbara and copied.qbara is not model.qbara
    assert copied.qbara.lq is not model.qbara.lq  # a copy, not shared


def _loaded_and_prepared():
    """What load_model(quant=) + prepare + a report leave on a model: every field set but fold_rounding."""
    model, _ = tiny_llama()
    state = state_of(model)
    state.base_fingerprint = model_fingerprint(model)
    quantize_model(model, INT4)
    state.loaded_quant = INT4
    prepare(model, INT4, QAHIRA)
    state.lq, state.gptq = "lq report", "gptq report"
    state.chat_template = "{{ messages[0]['content'] }}"  # qbara train: the template its prompts were rendered with
    randomize_adapters(model, std=0.01)
    return model


@pytest.mark.parametrize("into", ["quantized", "dense"])
def test_merge_drops_the_base_and_keeps_the_reports(into):
    model = _loaded_and_prepared()
    before = _fields(model.qbara)
    assert all(v is not None for k, v in before.items() if k != "fold_rounding")
    merge(model, into=into)
    after = _fields(model.qbara)
    dropped = {k for k in before if before[k] is not None and after[k] is None}
    assert dropped == {"base_fingerprint", "loaded_quant", "adapter_config"}
    assert after["lq"] == "lq report" and after["gptq"] == "gptq report"
    assert after["chat_template"] == before["chat_template"]  # the merged model is prompted as it was trained
    assert (after["fold_rounding"] is not None) == (into == "quantized")
    prepare(model, {}, AdapterConfig("lora", rank=2))  # a new base: fingerprinted afresh, not the old one
    assert model.qbara.base_fingerprint == model_fingerprint(model) != before["base_fingerprint"]


def test_dense_copy_and_dequantize_forget_the_base():
    from qbara.export.hf import dense_copy

    model = _loaded_and_prepared()
    before = _fields(model.qbara)
    dense = dense_copy(model)
    assert _fields(model.qbara) == before  # the model passed in keeps its state
    assert _fields(dense.qbara) == {**before, "base_fingerprint": None, "adapter_config": None, "loaded_quant": None}

    loaded, _ = load_model("tiny-llama", quant=INT4)
    dequantize_model(loaded)
    assert loaded.qbara.loaded_quant is None and loaded.qbara.base_fingerprint is None
    prepare(loaded, INT4)  # not mistaken for a model quantized on load: quantized again
    assert loaded.qbara.loaded_quant is None
    assert any(isinstance(m, QuantizedLinear) for m in loaded.modules())


def test_an_old_loose_attribute_is_refused_clearly():
    model, _ = tiny_llama()
    model.qbara_base_fingerprint = "0123456789abcdef"
    with pytest.raises(QbaraError, match=r"model\.qbara_base_fingerprint.*model\.qbara\.base_fingerprint"):
        prepare(model, INT4, QAHIRA)
    other, _ = tiny_llama()
    other.qbara = {"lq": None}
    with pytest.raises(QbaraError, match="not qbara's QbaraState"):
        state_of(other)


def _sources(*folders):
    return [p for folder in folders for p in sorted(folder.rglob("*.py"))]


def test_no_module_uses_the_old_loose_attributes():
    """Guards the refactor: qbara's state lives in model.qbara only; no qbara_* attribute is read or set on a model
    (not as `x.qbara_...`, not through getattr / hasattr / setattr / delattr, not named in a docstring)."""
    old = re.compile(r"\bqbara_(" + "|".join(OLD_ATTRIBUTES.values()) + r")\b")
    allowed = {"qbara_keep"}  # an attribute of qbara's HF Trainer (checkpoints to keep), not of a model
    found = []
    for path in _sources(PACKAGE, *[BENCH] * BENCH.is_dir()):
        text = path.read_text()
        found += [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}" for m in old.finditer(text)
                  if path != PACKAGE / "state.py"]
        if not path.is_relative_to(PACKAGE):
            continue
        for node in ast.walk(ast.parse(text)):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                name = node.args[1].value
            if name and name.startswith("qbara_") and name not in allowed:
                found.append(f"{path}:{node.lineno}: {name}")
    assert not found, "qbara keeps a model's state in model.qbara (qbara.state.state_of):\n" + "\n".join(found)
