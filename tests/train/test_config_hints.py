"""Hints for keys from other tools: aliases that work, refusals that say why, did-you-mean only for near-misses."""
import re

import pytest

from qbara.adapters.config import AdapterConfig
from qbara.errors import QbaraError
from qbara.train.config import ALIASES, build_config, valid_keys
from qbara.train.foreign_keys import UNSUPPORTED


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_names_a_real_key(alias):
    assert ALIASES[alias] in valid_keys()


def test_refused_keys_are_neither_keys_nor_aliases():
    names = {k.split(".", 1)[1] for k in valid_keys()} | set(valid_keys()) | set(ALIASES)
    assert not names & set(UNSUPPORTED)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_every_refused_key_says_why_wherever_it_is_written(key):
    tool, why = UNSUPPORTED[key]
    expected = re.escape(f"({tool}) is not supported: {why}")
    for data, overrides in [({key: 1}, {}), ({key: {"nested": 1}}, {}), ({}, {key: 1}), ({}, {f"train.{key}": 1}),
                            ({"train": {key: 1}}, {})]:
        with pytest.raises(QbaraError, match=expected):
            build_config(data, overrides)


# The misleading hints of issue 27: each key now maps to its qbara field or is refused by name.
@pytest.mark.parametrize("key,value,outcome", [
    ("load_in_4bit", True, "set quant.format nf4"),
    ("bnb_4bit_quant_type", "nf4", ("quant", "format")),
    ("use_dora", True, "qbara has no DoRA"),
    ("use_rslora", True, "alpha / sqrt(rank)"),
    ("lora_target_linear", True, "all-linear"),
    ("val_set_size", 0.05, ("data", "held_out")),
    ("datasets", [{"path": "x.jsonl", "type": "alpaca"}], "set data.train"),
    ("micro_batch_size", 2, ("train", "batch_size")),
    ("lora_rank", 4, ("adapter", "rank")),
    ("bnb_4bit_use_double_quant", False, ("quant", "double_quant")),
])
def test_foreign_keys_of_the_issue_map_or_are_refused(key, value, outcome):
    if isinstance(outcome, str):
        with pytest.raises(QbaraError, match=re.escape(outcome)) as err:
            build_config({key: value})
        assert "did you mean" not in str(err.value)
        return
    section, name = outcome
    part = getattr(build_config({key: value}), section)
    assert (part[name] if isinstance(part, dict) else getattr(part, name)) == value


@pytest.mark.parametrize("key", ["wandb_entity", "hub_model_id", "push_to_hub", "neftune_noise_alpha",
                                 "train.dataloader_pin_memory", "adapter.lora_bias"])
def test_no_did_you_mean_for_a_name_unlike_any_key(key):
    with pytest.raises(QbaraError, match=re.escape(f"unknown config key {key!r} (keys are")):
        build_config({}, {key: 1})


@pytest.mark.parametrize("key,suggestion", [
    ("eval_step", "'eval_steps'"), ("train.outputdir", "'train.output_dir'"), ("lora_alpah", "'lora_alpha' (= "),
    ("trian.lr", "'train.lr'"), ("gradient_checkpoint", "'gradient_checkpointing'"),
])
def test_a_near_miss_still_gets_its_suggestion(key, suggestion):
    with pytest.raises(QbaraError, match=re.escape(f"did you mean {suggestion}")):
        build_config({}, {key: 1})


def test_qlora_is_lora_on_nf4_with_a_note(capsys):
    for data in ({"adapter": {"method": "qlora"}}, {"adapter": "qlora"}, {"finetuning_type": "qlora"}):
        config = build_config(data)
        assert config.adapter_config().method == "lora" and config.quant_config().format == "nf4"
        assert "adapter.method qlora is method lora on the NF4 base" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["int4", "nf3", "gguf:q4_k"])
def test_qlora_on_another_format_names_both_fixes(fmt):
    message = f"adapter.method qlora is LoRA on an NF4 base, but quant.format is {fmt!r}: write adapter.method lora"
    with pytest.raises(QbaraError, match=re.escape(message)):
        build_config({"quant": {"format": fmt}, "adapter": {"method": "qlora"}})


def test_adapter_config_qlora_points_to_lora_not_qalora():
    with pytest.raises(QbaraError, match="is QLoRA, which is method 'lora' on an NF4 base") as err:
        AdapterConfig(method="qlora")
    assert "qalora" not in str(err.value)


def test_an_axolotl_style_config_resolves(tmp_path):
    config = build_config({"base_model": "tiny-llama", "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
                           "lora_target_modules": ["q_proj", "v_proj"], "sequence_len": 128, "val_set_size": 0.1,
                           "micro_batch_size": 2, "num_epochs": 3, "optimizer": "adafactor", "lr_scheduler": "cosine",
                           "learning_rate": 1e-4})
    adapter = config.adapter_config()
    assert (adapter.method, adapter.rank, adapter.alpha, adapter.target_modules) == ("lora", 4, 8, ("q_proj", "v_proj"))
    assert (config.model.name, config.data.max_length, config.data.held_out) == ("tiny-llama", 128, 0.1)
    t = config.train
    assert (t.batch_size, t.epochs, t.steps, t.optim, t.scheduler, t.lr) == (2, 3.0, -1, "adafactor", "cosine", 1e-4)


def test_bare_model_and_adapter_overrides_read_as_the_yaml_shorthands(tmp_path, monkeypatch):
    """`--model NAME` is model.name (as `model: NAME` in YAML); `--adapter qlora` / `--adapter qahira` the method
    (as Axolotl's `adapter: qlora`), while `--adapter FOLDER` stays the starting adapter folder."""
    config = build_config({}, {"model": "tiny-llama", "adapter": "qahira", "quant.format": "int4",
                               "quant.block_size": 32})
    assert config.model.name == "tiny-llama" and config.adapter["method"] == "qahira" and config.model.adapter == ""
    assert build_config({}, {"adapter": "qlora"}).adapter["method"] == "lora"  # NF4 by default: QLoRA is LoRA
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lora").mkdir()  # a folder of that name is the folder
    config = build_config({}, {"adapter": "lora"})
    assert config.model.adapter == "lora" and config.adapter["method"] == "lora"
    assert build_config({}, {"adapter": "runs/x/adapter"}).model.adapter == "runs/x/adapter"
