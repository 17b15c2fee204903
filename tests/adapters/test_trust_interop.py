"""Issue #26: what transformers and PEFT print when they meet qbara's own folders names the qbara call that loads
them, and qbara still reads the folders earlier versions wrote."""
import json

import pytest
import torch

from qbara import QuantConfig, load_adapter, prepare, save_adapter
from qbara.adapters.config import AdapterConfig
from qbara.models import tiny_llama
from qbara.models.loader import load_model
from qbara.native import save_quantized

peft = pytest.importorskip("peft")
IDS = torch.tensor([[1, 7, 42, 3, 9, 100]])


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    model, tokenizer = tiny_llama(seed=0)
    prepare(model, QuantConfig("int4", 32))
    return save_quantized(model, tokenizer, tmp_path_factory.mktemp("native") / "q")


def test_transformers_names_qbara_load_model_for_a_native_folder(native):
    import logging

    from transformers import AutoModelForCausalLM

    logger, seen = logging.getLogger("transformers"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)  # what transformers prints on stderr (its own handler; it does not propagate)
    try:
        with pytest.raises(OSError):
            AutoModelForCausalLM.from_pretrained(str(native))
    finally:
        logger.removeHandler(handler)
    printed = "\n".join(seen)
    assert "Unknown quantization type, got qbara (" in printed
    assert "use qbara.load_model(folder)" in printed


@torch.no_grad()
def test_native_folder_of_earlier_versions_still_loads(native, tmp_path):
    import shutil

    old = shutil.copytree(native, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "qbara"  # as qbara wrote it before
    (old / "config.json").write_text(json.dumps(config))
    expected, _ = load_model(str(native))
    model, _ = load_model(str(old))
    assert torch.equal(model(IDS).logits, expected(IDS).logits)


@pytest.fixture
def qahira(tmp_path):
    model, _ = tiny_llama(seed=0)
    prepare(model, QuantConfig("int4", 32), AdapterConfig("qahira", rank=4, alpha=8))
    return save_adapter(model, tmp_path / "qahira")


@pytest.mark.parametrize("load", [
    lambda folder: peft.PeftConfig.from_pretrained(str(folder)),
    lambda folder: peft.PeftModel.from_pretrained(tiny_llama(seed=0)[0], str(folder)),
], ids=["PeftConfig", "PeftModel"])
def test_peft_refusal_of_a_qbara_only_folder_says_what_loads_it(qahira, load):
    with pytest.raises(KeyError) as err:
        load(qahira)
    assert "QAHIRA (a qbara adapter: PEFT cannot load it; use qbara.load_adapter" in str(err.value)


@torch.no_grad()
def test_qbara_reads_new_and_old_qbara_only_folders(qahira):
    new, _ = tiny_llama(seed=0)
    load_adapter(new, qahira)
    path = qahira / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "QAHIRA"}))  # as written before
    old, _ = tiny_llama(seed=0)
    load_adapter(old, qahira)
    assert torch.equal(old(IDS).logits, new(IDS).logits)
