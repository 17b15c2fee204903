"""Issue #26: a PEFT adapter folder trained on a qbara-quantized base is not silently run on the dense base from
the CLI: `--quant FORMAT[:BLOCK]` (eval, merge, export) gives the base's quantization, and a folder whose
recorded base is a qbara quantized folder is refused on a dense base without it, naming the option."""
import json

import pytest
import torch

from qbara import AdapterConfig, QbaraError, QuantConfig, prepare, register_with_peft, save_adapter
from qbara.cli import main
from qbara.models import tiny_llama
from qbara.models.loader import load_model
from qbara.native import save_quantized
from qbara.pretrained import from_pretrained

peft = pytest.importorskip("peft")
INT4 = QuantConfig("int4", block_size=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """hf: the dense tiny-llama; q: it quantized INT4 G32 (native folder); peft: a LoRA PEFT trained on q."""
    root = tmp_path_factory.mktemp("peft_base")
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(root / "hf", safe_serialization=True)
    tokenizer.save_pretrained(root / "hf")
    quantized, tokenizer = load_model(str(root / "hf"), quant=INT4)
    save_quantized(quantized, tokenizer, root / "q")
    base, _ = load_model(str(root / "q"))
    wrapped = peft.get_peft_model(base, register_with_peft(peft.LoraConfig(r=4, lora_alpha=8,
                                                                           target_modules=["q_proj", "v_proj"])))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    wrapped.save_pretrained(root / "peft")
    return root


def _eval(capsys, *argv):
    code = main(["eval", "--max-tokens", "16", "--window", "8", "--json", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_peft_folder_records_the_quantized_folder_as_its_base(folders):
    config = json.loads((folders / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folders / "q")


@pytest.mark.parametrize("command", ["eval", "merge", "export"])
def test_dense_base_without_quant_is_refused_naming_the_option(folders, command, capsys, tmp_path):
    argv = {"eval": ["eval", "--max-tokens", "16"],
            "merge": ["merge", "--out", str(tmp_path / "merged")],
            "export": ["export", "--format", "hf", "--out", str(tmp_path / "exported")]}[command]
    code = main([*argv, "--model", str(folders / "hf"), "--adapter", str(folders / "peft")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"a PEFT adapter trained on the qbara-quantized base '{folders / 'q'}'" in err
    assert "--quant FORMAT[:BLOCK]" in err and f"--model {folders / 'q'}" in err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "exported").exists()


def test_the_library_refuses_it_too_naming_quant(folders):
    with pytest.raises(QbaraError, match="quant=QuantConfig"):
        from_pretrained(str(folders / "hf"), adapter=str(folders / "peft"))


def test_quant_option_quantizes_the_dense_base_like_the_folder_it_was_trained_on(folders, capsys):
    code, out, err = _eval(capsys, "--model", str(folders / "hf"), "--adapter", str(folders / "peft"),
                           "--quant", "int4:32")
    assert code == 0, err
    with_option = json.loads(out)
    code, out, err = _eval(capsys, "--model", str(folders / "q"), "--adapter", str(folders / "peft"))
    assert code == 0, err
    on_saved_base = json.loads(out)
    assert with_option["ppl"] == on_saved_base["ppl"] and with_option["tokens"] == on_saved_base["tokens"]


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_take_the_quant_option(folders, command, tmp_path, capsys):
    argv = {"merge": ["merge", "--out", str(tmp_path / "out")],
            "export": ["export", "--format", "hf", "--out", str(tmp_path / "out")]}[command]
    code = main([*argv, "--model", str(folders / "hf"), "--adapter", str(folders / "peft"), "--quant", "int4:32"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").is_file()


def test_quant_option_is_refused_for_a_qbara_adapter_and_without_an_adapter(folders, tmp_path, capsys):
    model, _ = tiny_llama(seed=0)
    prepare(model, INT4, AdapterConfig("lora", rank=4, alpha=8))
    save_adapter(model, tmp_path / "qbara")
    code, _, err = _eval(capsys, "--model", "tiny-llama", "--adapter", str(tmp_path / "qbara"), "--quant", "nf4")
    assert code == 2 and "is a qbara adapter: its record says how its base is quantized" in err
    code, _, err = _eval(capsys, "--model", "tiny-llama", "--quant", "nf4")
    assert code == 2 and "--quant nf4 is the quantization of a PEFT adapter's base; it needs --adapter" in err
    code, _, err = _eval(capsys, "--model", str(folders / "hf"), "--adapter", str(folders / "peft"),
                         "--quant", "int4:x")
    assert code == 2 and "bad format 'int4:x'" in err
