"""A data or run-config error costs no model load: `qbara train`, `eval`, `lq` and `quantize` check their data
files, records and settings before the weights are read (load_model fails the test if called)."""
import json

import pytest

from qbara.cli import main
from qbara.errors import QbaraError
from qbara.train.config import build_config
from qbara.train.trainer import train


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the error was found")


@pytest.fixture
def no_load(monkeypatch):
    """Every way the commands load weights fails the test."""
    for target in ("qbara.train.trainer.load_model", "qbara.models.loader.load_model", "qbara.pretrained.load_model",
                   "qbara.commands.eval.load_for_eval", "qbara.commands.lq.load_model",
                   "qbara.commands.lq.load_calibration_model", "qbara.commands.lq.prepare",
                   "qbara.commands.quantize.load_model"):
        monkeypatch.setattr(target, _no_model_load)


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    return path


GOOD = {"instruction": "Add 2 and 3.", "output": "5"}


def _run_config(tmp_path, data=None, **sections):
    data = data or {"train": str(_write(tmp_path / "train.jsonl", [GOOD] * 4))}
    config = {"model": "tiny-llama", "quant": {"format": "int4", "block_size": 32},
              "adapter": {"method": "lora", "rank": 4, "alpha": 8}, "data": {"max_length": 512, **data},
              "train": {"output_dir": str(tmp_path / "out"), "steps": 2, "progress": False}}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return build_config(config)


def _bad_data(tmp_path):
    """(data section, message) for each data error."""
    long_prompt = {"instruction": "word " * 400, "output": "5"}
    return {
        "missing file": ({"train": str(tmp_path / "missing.jsonl")}, "not found"),
        "missing eval file": ({"train": str(_write(tmp_path / "ok.jsonl", [GOOD])),
                               "eval": str(tmp_path / "nope.jsonl")}, "not found"),
        "no answer tokens": ({"train": str(_write(tmp_path / "long.jsonl", [GOOD, long_prompt]))},
                             "record 2 has no answer tokens within data.max_length=512"),
        "malformed record": ({"train": str(_write(tmp_path / "bad.jsonl", [GOOD, '{"instruction": "x",']))},
                             "record 2"),
        "record not an object": ({"train": str(_write(tmp_path / "list.jsonl", [GOOD, [1, 2]]))},
                                 "record 2 is not a JSON object"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing eval file", "no answer tokens", "malformed record",
                                  "record not an object"])
def test_train_data_errors_come_before_the_model_loads(tmp_path, no_load, case):
    data, message = _bad_data(tmp_path)[case]
    with pytest.raises(QbaraError, match=message):
        train(_run_config(tmp_path, data))


@pytest.mark.parametrize("sections, message", [
    ({"data": {"max_length": 4096}}, "exceeds the model's context of 2048"),
    ({"adapter": {"target_modules": ["qkv"]}}, "no linear layer of this model matches"),
    ({"quant": {"block_size": 256}}, "does not divide its 64 input features"),
    ({"adapter": {"method": "qahira", "pool_in": 48}}, "48"),
])
def test_train_config_errors_come_before_the_model_loads(tmp_path, no_load, sections, message):
    with pytest.raises(QbaraError, match=message):
        train(_run_config(tmp_path, **sections))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, merged", [("lora", "merged"), ("qahira", "merged-quantized")])
def test_train_still_trains_with_the_checks_first_and_names_the_next_commands(tmp_path, capsys, method, merged):
    """The tokenizer used for the data is the one the model comes with: the run trains and saves; its summary
    names the next commands with this run's paths (a merge into the quantized base for an adapter that folds),
    and they run as printed (a shell comment ends some of them)."""
    import shlex

    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_run_config(tmp_path, adapter={"method": method}).to_dict()))
    assert main(["train", "--config", str(config)]) == 0
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    lines = capsys.readouterr().out.splitlines()
    assert "train loss logged (train.logging_steps=5 is past" in lines[lines.index("next:") - 1]  # steps=2
    commands = [shlex.split(line, comments=True) for line in lines[lines.index("next:") + 1:]]
    assert ("--into" in commands[1]) == (method == "qahira")
    assert [c[:2] for c in commands] == [["qbara", v] for v in ("eval", "merge", "export", "generate")]
    for command in commands:
        assert command[command.index("--model") + 1] == "tiny-llama"
        assert command[command.index("--adapter") + 1] == str(adapter)
    for command in commands[:3]:  # eval, merge, export run as printed (generate is another command's)
        assert main(command[1:]) == 0, command
    assert (tmp_path / "out" / merged / "config.json").is_file() and (tmp_path / "out" / "model.gguf").is_file()


def test_eval_loss_checks_records_before_the_model_loads(tmp_path, no_load, capsys):
    data = _write(tmp_path / "long.jsonl", [GOOD, {"instruction": "word " * 400, "output": "5"}])
    assert main(["eval", "--model", "tiny-llama", "--task", "loss", "--data", str(data), "--window", "512"]) == 2
    assert "record 2 has no answer tokens" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["loss", "ppl"])
def test_eval_missing_data_file_before_the_model_loads(tmp_path, no_load, capsys, task):
    assert main(["eval", "--model", "tiny-llama", "--task", task, "--data", str(tmp_path / "none.txt")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--fisher-data", "--eval", "--fisher"])
def test_lq_reads_its_data_before_the_model_loads(tmp_path, no_load, capsys, option):
    out = tmp_path / "lq"
    assert main(["lq", "--model", "tiny-llama", "--out", str(out), option, str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert "none.txt" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_quantize_unknown_play_before_the_model_loads(no_load, capsys):
    assert main(["quantize", "--model", "tiny-llama", "--play", "no-such-play"]) == 2
    assert "no-such-play" in capsys.readouterr().err


def test_the_tokenizer_and_config_read_alone_are_those_of_the_loaded_model(tmp_path):
    """load_model_tokenizer / load_model_config give, for each model source (built-in test model, HF folder,
    qbara quantized folder, GGUF file), the tokenizer load_model returns (same ids for a text) and its
    model's config (same context and shapes)."""
    from qbara.models import load_model, tiny_llama
    from qbara.models.loader import load_model_config, load_model_tokenizer
    from qbara.models.streaming import quantize_model
    from qbara.native import save_quantized
    from qbara.quant.config import QuantConfig

    model, tokenizer = tiny_llama()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "hf")
    quantized, _ = tiny_llama()
    save_quantized(quantize_model(quantized, QuantConfig.from_dict({"format": "int4", "block_size": 32})),
                   tokenizer, tmp_path / "q")
    assert main(["export", "--model", str(tmp_path / "hf"), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--embedding-type", "f32", "--dense-type", "f32"]) == 0
    text = "Below is an instruction.\n### Response:\nfünf <|endoftext|>"
    for source in ("tiny-llama", tmp_path / "hf", tmp_path / "q", tmp_path / "m.gguf"):
        loaded, loaded_tokenizer = load_model(str(source))
        alone = load_model_tokenizer(source)
        assert alone(text).input_ids == loaded_tokenizer(text).input_ids, source
        assert (alone.eos_token_id, alone.pad_token_id) == (loaded_tokenizer.eos_token_id,
                                                            loaded_tokenizer.pad_token_id), source
        config = load_model_config(source)
        for key in ("max_position_embeddings", "hidden_size", "num_hidden_layers", "intermediate_size",
                    "vocab_size"):
            assert getattr(config, key) == getattr(loaded.config, key), (source, key)
