"""`qbara quantize`: the default comparison is unchanged; --gptq adds GPTQ rows and --save writes a GPTQ base;
--imatrix adds rows with importance-weighted rounding of the gguf:* formats."""
import json

import pytest
import yaml

from qbara import QuantConfig
from qbara.cli import main

FAST = ["--model", "tiny-llama", "--eval-tokens", "1024", "--json"]
CALIBRATION = ["--calibration-samples", "4", "--calibration-length", "32"]


def _rows(capsys) -> dict[str, dict]:
    return {row["label"]: row for row in json.loads(capsys.readouterr().out)}


def test_default_rows_have_no_gptq(capsys):
    assert main(["quantize", *FAST, "--formats", "int3:32"]) == 0
    assert list(_rows(capsys)) == ["fp32", "int3-g32"]


def test_gptq_adds_a_row_per_int_format(capsys):
    assert main(["quantize", *FAST, "--formats", "nf4,int3:32", "--gptq", *CALIBRATION]) == 0
    rows = _rows(capsys)
    assert list(rows) == ["fp32", "nf4-b64-dq8/fp32/256", "int3-g32", "gptq int3-g32"]
    assert rows["gptq int3-g32"]["bits_per_param"] == rows["int3-g32"]["bits_per_param"] == 4.0


def test_imatrix_adds_a_weighted_row_per_gguf_format(capsys):
    assert main(["quantize", *FAST, "--formats", "int4:32,gguf:q4_0", "--imatrix", *CALIBRATION]) == 0
    rows = _rows(capsys)
    assert list(rows) == ["fp32", "int4-g32", "gguf:q4_0", "imatrix gguf:q4_0"]
    plain, weighted = rows["gguf:q4_0"], rows["imatrix gguf:q4_0"]
    assert weighted["bits_per_param"] == plain["bits_per_param"] == 4.5
    assert weighted["weight_rel_error"] != plain["weight_rel_error"]  # other codes: the rounding was weighted


@pytest.mark.parametrize("args, message", [
    (["--formats", "nf4", "--gptq"], "--gptq quantizes INT formats with 1 x G groups"),
    (["--formats", "int4:32", "--imatrix"], "--imatrix weights the rounding of gguf:* formats"),
    (["--formats", "int4:32", "--save", "x"], "go with --gptq"),
    (["--formats", "int4:32", "--calibration-samples", "8"], "go with --gptq"),
    (["--formats", "int4:32,int3:32", "--gptq", "--save", "x"], "--save writes one GPTQ model"),
])
def test_bad_gptq_options_give_one_message(args, message, capsys):
    assert main(["quantize", *FAST, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_saved_gptq_base_trains_lora(tmp_path, capsys):
    """GPTQ-LoRA from the command line: qbara quantize --gptq --save DIR, then qbara train --model.name DIR."""
    folder = tmp_path / "gptq"
    assert main(["quantize", *FAST, "--formats", "int3:32", "--gptq", *CALIBRATION, "--save", str(folder)]) == 0
    assert (folder / "qbara_quant.json").is_file()
    records = tmp_path / "t.jsonl"
    records.write_text("\n".join([json.dumps({"instruction": "Say hi.", "output": "hi"})] * 8))
    config = {"model": str(folder), "quant": {"format": "int3", "block_size": 32},
              "adapter": {"method": "lora", "rank": 4}, "data": {"train": str(records), "max_length": 256},
              "train": {"output_dir": str(tmp_path / "out"), "steps": 2, "batch_size": 2, "save_steps": 2,
                        "progress": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--quant.format", "int4", "--train.output_dir",
                 str(tmp_path / "out2")]) == 2
    assert "already quantized as int3-g32, not int4-g32" in capsys.readouterr().err


@pytest.mark.parametrize("spec,expected", [
    ("nf3:64", QuantConfig("nf3", block_size=64)), ("int4:4x8", QuantConfig("int4", block_size=4, block_rows=8)),
    ("gguf:q4_k", QuantConfig("gguf:q4_k")), ("GGUF:Q6_K", QuantConfig("gguf:q6_k")),
    ("gguf:iq4_xs", QuantConfig("gguf:iq4_xs"))])
def test_format_specs_parse(spec, expected):
    from qbara.commands.quantize import parse_format

    assert parse_format(spec) == expected
