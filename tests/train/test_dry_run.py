"""`qbara train --dry-run`: the resolved config, the data statistics and the plan, with no weights loaded and
nothing written; its trainable parameter count is the one of the model `prepare` builds."""
import json
import os
import re

import pytest
import yaml

from qbara.adapters.attach import trainable_parameter_count
from qbara.cli import main
from qbara.models import load_model, tiny_llama
from qbara.preparation import prepare
from qbara.train.config import build_config


def _tree(folder) -> dict:
    """Every path below `folder` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def model_folder(tmp_path):
    model, tokenizer = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


SHORT = {"instruction": "Add 2 and 3.", "output": "5"}
LONG = {"instruction": "Count.", "output": "one two three " * 60}  # answer tokens cut at max_length=256
NO_ANSWER = {"instruction": "word " * 200, "output": "5"}  # the prompt alone fills max_length: skipped


def _run_yaml(tmp_path, model_path, **sections) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([json.dumps(r) for r in [SHORT] * 7 + [LONG] * 2 + [NO_ANSWER]] + ['{"bad": ']))
    config = {"model": {"name": str(model_path)}, "quant": {"format": "int4", "block_size": 32},
              "adapter": {"method": "qbara", "rank": 4, "alpha": 8},
              "data": {"train": str(data), "max_length": 256, "on_error": "skip"},
              "train": {"output_dir": str(tmp_path / "out"), "steps": 0, "epochs": 3, "batch_size": 2,
                        "grad_accum": 2, "save_steps": 2}}
    for section, values in sections.items():
        config[section] = {**config[section], **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_dry_run_loads_no_weights_and_writes_nothing(tmp_path, model_folder, monkeypatch, capsys):
    def loads(*args, **kwargs):
        raise AssertionError("weights were loaded")

    for target in ("qbara.train.trainer.load_model", "qbara.models.loader.load_model",
                   "qbara.models.loader._load_hf_folder", "qbara.models.loader.load_quantized_stream",
                   "qbara.models.streaming.stream_checkpoint", "safetensors.torch.load_file", "qbara.tensor_checks.read_safetensors",
                   "transformers.AutoModelForCausalLM.from_pretrained"):
        monkeypatch.setattr(target, loads)
    config = _run_yaml(tmp_path, model_folder)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert main(["train", "--config", config, "--dry-run"]) == 0
    assert _tree(tmp_path) == before
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("# resolved run config\n", 1)[1].split("# data\n", 1)[0])
    assert set(resolved) == {"model", "quant", "adapter", "data", "train"}
    assert resolved["quant"]["dq_bits"] == 8 and resolved["adapter"]["init"] == "default"  # defaults filled in
    assert resolved["train"]["epochs"] == 3
    # 11 lines: 9 usable records, 1 whose prompt fills max_length, 1 not JSON; 2 answers cut at max_length.
    train_line = re.search(r"^train: (\d+) records -> (\d+) examples \((\d+) skipped, (\d+) truncated .*max (\d+)$",
                           out, re.M)
    assert train_line and tuple(map(int, train_line.groups())) == (11, 9, 2, 2, 256), out
    # 9 examples in batches of 2, 2 batches a step: ceil(5 / 2) = 3 steps an epoch, 3 epochs.
    assert "steps: 9 optimizer steps" in out
    assert "checkpoints: at steps 2, 4, 6, 8, 9" in out
    assert "LlamaForCausalLM" in out and "int4-g32" in out


@pytest.mark.parametrize("adapter", [
    {"method": "lora", "rank": 4},
    {"method": "lora", "rank": 8, "target_modules": ["q_proj", "v_proj"]},
    {"method": "qalora", "rank": 4},
    {"method": "qbara", "rank": 4},
    {"method": "qahira", "rank": 4},
    {"method": "lora", "rank": 4, "init": "loftq"},
])
def test_dry_run_trainable_count_equals_the_prepared_model(tmp_path, model_folder, adapter, capsys):
    config = _run_yaml(tmp_path, model_folder, adapter=adapter)
    assert main(["train", "--config", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    planned = int(re.search(r"([\d,]+) trainable parameters", out).group(1).replace(",", ""))
    run = build_config(yaml.safe_load(open(config)))
    model, _ = load_model(str(model_folder))
    prepare(model, run.quant_config(), run.adapter_config())
    assert planned == trainable_parameter_count(model) > 0


def test_dry_run_reports_a_config_error_as_the_run_would(tmp_path, model_folder, capsys):
    config = _run_yaml(tmp_path, model_folder, data={"max_length": 4096})
    assert main(["train", "--config", config, "--dry-run"]) == 2
    assert "exceeds the model's context of 2048" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_dry_run_from_a_starting_adapter_counts_its_parameters(tmp_path, model_folder, capsys):
    from qbara.adapters.config import AdapterConfig
    from qbara.adapters.io import load_adapter, save_adapter
    from qbara.quant.config import QuantConfig

    model, _ = load_model(str(model_folder))
    prepare(model, QuantConfig.from_dict({"format": "nf4", "block_size": 32}), AdapterConfig(method="qalora", rank=4))
    save_adapter(model, tmp_path / "start", base_model_name=str(model_folder))
    config = _run_yaml(tmp_path, model_folder, model={"adapter": str(tmp_path / "start")})
    assert main(["train", "--config", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    planned = int(re.search(r"([\d,]+) trainable parameters", out).group(1).replace(",", ""))
    fresh, _ = load_model(str(model_folder), quant=QuantConfig.from_dict({"format": "nf4", "block_size": 32}))
    load_adapter(fresh, tmp_path / "start")
    assert planned == trainable_parameter_count(fresh) > 0
    assert "nf4" in out and "as recorded by" in out


def test_dry_run_counts_the_model_parameters_as_loaded_tied_embeddings_once(tmp_path, capsys):
    model, tokenizer = tiny_llama(tie_word_embeddings=True)
    folder = tmp_path / "tied"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    assert main(["train", "--config", _run_yaml(tmp_path, folder), "--dry-run"]) == 0
    planned = int(re.search(r"LlamaForCausalLM, ([\d,]+) parameters", capsys.readouterr().out).group(1)
                  .replace(",", ""))
    loaded, _ = load_model(str(folder))
    assert planned == sum(p.numel() for p in loaded.parameters())


@pytest.mark.parametrize("template, named, marker", [
    ("auto", "auto -> the tokenizer's own chat template", "<|im_start|>user\nAdd 2 and 3.<|im_end|>"),
    ("alpaca", "data.template alpaca;", "### Instruction:\nAdd 2 and 3.\n\n### Response:\n")])
def test_dry_run_names_the_template_and_shows_the_first_prompt(tmp_path, model_folder, capsys, template, named,
                                                               marker):
    """The prompt line says what data.template resolved to and shows the first record's prompt as the tokens
    the model is trained on decode (the tiny tokenizer has a ChatML template: auto takes it)."""
    from qbara.models.loader import load_model_tokenizer
    from qbara.prompt_formats import resolve_template

    assert main(["train", "--config", _run_yaml(tmp_path, model_folder, data={"template": template}),
                 "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("prompts: "))
    assert named in line and repr(marker)[1:-1] in line
    tokenizer = load_model_tokenizer(str(model_folder))
    prompt = resolve_template(template, tokenizer).template.render([{"role": "user", "content": "Add 2 and 3."}],
                                                                   add_generation_prompt=True)
    assert line.endswith(repr(prompt))  # all of it: shorter than the 400 characters shown in full
