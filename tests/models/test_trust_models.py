"""Issue #26, model folders and run configs (the reader fuzz pass, bench/fuzz_readers.py): a config.json value of
the wrong type or range for transformers' config class, a damaged tokenizer.json, a string model_max_length, a
run-config key left empty and non-finite entries in a config list are each one QbaraError (CLI: exit 2, one line)
naming the file and the value, never a traceback from transformers, tokenizers or a comparison with None."""
import json
import math
from pathlib import Path

import pytest

import qbara
from qbara.cli import main
from qbara.errors import QbaraError
from qbara.train.config import build_config, load_run_config
from qbara.validate import check_config_values
from tests import test_hardening
from tests.test_hardening import QUANT, _check_one_line, _copy, _edit_json, _eval_model, _yaml

good = test_hardening.good  # the fixture: a tiny HF folder, an adapter, a native quantized folder, a tiny GGUF

# ---------------------------------------------------------------- config.json values transformers refuses

# case -> (config.json edit, the field the refusal names); the fuzz pass's signatures 44, 47, 49 and cli 6
WRONG_TYPES = {
    "mlp_bias 2**63": ({"mlp_bias": 2**63}, "mlp_bias"),
    "max_position_embeddings huge string": ({"max_position_embeddings": "A" * 1_000_000}, "max_position_embeddings"),
    "eos_token_id '256'": ({"eos_token_id": "256"}, "eos_token_id"),
    "num_attention_heads 2**31": ({"num_attention_heads": 2**31}, "num_attention_heads"),
    "tie_word_embeddings 'yes'": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    "pad_token_id 1.5": ({"pad_token_id": 1.5}, "pad_token_id"),
    "eos_token_id [256, '1']": ({"eos_token_id": [256, "1"]}, "eos_token_id"),
}


def _folder_with(tmp: Path, good: Path, source: str, values: dict) -> Path:
    folder = _copy(good / source, tmp / f"bad-{source}")
    _edit_json(folder / "config.json", lambda d: d.update(values))
    return folder


def _refusal(call) -> str:
    with pytest.raises(QbaraError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and len(text) < 1000, text
    return text


@pytest.mark.parametrize("source", ["hf", "quantized"])
@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_config_value_transformers_refuses_is_one_error(case, source, good, tmp_path):
    values, field = WRONG_TYPES[case]
    folder = _folder_with(tmp_path, good, source, values)
    text = _refusal(lambda: qbara.load_model(str(folder)))
    assert "config.json" in text and field in text, text


@pytest.mark.parametrize("case", ["mlp_bias 2**63", "num_attention_heads 2**31"])
def test_quantize_on_load_config_value_is_one_error(case, good, tmp_path):
    values, field = WRONG_TYPES[case]
    folder = _folder_with(tmp_path, good, "hf", values)
    text = _refusal(lambda: qbara.load_model(str(folder), quant=QUANT))
    assert "config.json" in text and field in text, text


def test_native_config_value_on_the_cli_is_one_line(good, tmp_path, capsys):
    folder = _folder_with(tmp_path, good, "quantized", {"eos_token_id": "256"})
    capsys.readouterr()
    rc = main(_eval_model(folder))
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "config.json" in err and "eos_token_id" in err, err


@pytest.mark.parametrize("values, message", [
    ({"hidden_act": 5}, "Validation error for field 'hidden_act'"),  # a field's type
    ({"num_attention_heads": 3, "num_key_value_heads": 1}, "number of attention heads (3)"),  # a class validator
])
def test_load_config_turns_transformers_validation_into_one_error(values, message, good, tmp_path):
    from qbara.models.files import load_config

    folder = _folder_with(tmp_path, good, "hf", values)  # values check_config_values lets through
    text = _refusal(lambda: load_config(folder))
    assert text.startswith(str(folder / "config.json")) and message in text and "config is damaged" in text, text
    assert load_config(good / "hf").num_attention_heads == 4


@pytest.mark.parametrize("load", ["plain", "quantize on load"])
@pytest.mark.parametrize("source", ["hf", "quantized"])
def test_pad_token_id_past_the_vocabulary_is_one_error(source, load, good, tmp_path):
    if source == "quantized" and load != "plain":
        pytest.skip("a quantized folder is not quantized on load")
    folder = _folder_with(tmp_path, good, source, {"pad_token_id": 2**31})  # torch asserts in nn.Embedding
    quant = QUANT if load != "plain" else None
    text = _refusal(lambda: qbara.load_model(str(folder), quant=quant))
    assert "Padding_idx must be within num_embeddings" in text and str(folder) in text, text


# ---------------------------------------------------------------- type checks of our own (before transformers)


@pytest.mark.parametrize("values, message", [
    ({"mlp_bias": 2**63}, "mlp_bias is 9223372036854775808, it must be true or false"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings is 'yes', it must be true or false"),
    ({"eos_token_id": "256"}, "eos_token_id is '256', it must be a token id"),
    ({"eos_token_id": [1, True]}, "eos_token_id is [1, True], it must be a token id"),
    ({"bos_token_id": 1.0}, "bos_token_id is 1.0, it must be a token id"),
    ({"num_attention_heads": 2**31}, "num_attention_heads is 2147483648, it must be at most hidden_size (64)"),
    ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0, math.nan], "short_factor": [1.0, 1.0]}},
     "long_factor[1] is nan, it must be a finite number"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0, -math.inf]}},
     "short_factor[1] is -inf, it must be a finite number"),
])
def test_check_config_values_checks_types_and_list_entries(values, message):
    config = {"hidden_size": 64, "num_attention_heads": 4, "eos_token_id": 2, "pad_token_id": None,
              "tie_word_embeddings": False, **values}
    with pytest.raises(QbaraError, match="config is damaged") as info:
        check_config_values(config, "config.json")
    assert message in str(info.value), info.value


def test_check_config_values_keeps_valid_configs():
    check_config_values({"eos_token_id": [1, 2], "bos_token_id": None, "pad_token_id": -1, "mlp_bias": True,
                         "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0, 2], "factor": 2.0}},
                        "config.json")


def test_hf_folder_long_factor_nan_is_refused(good, tmp_path):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 7 + [math.nan],
            "short_factor": [1.0] * 8, "original_max_position_embeddings": 1024}
    folder = _folder_with(tmp_path, good, "hf", {"rope_parameters": rope})
    text = _refusal(lambda: qbara.load_model(str(folder)))
    assert "long_factor[7] is nan" in text and "config.json" in text, text


# ---------------------------------------------------------------- tokenizer files


def _vocab_entry(doc: dict) -> str:
    return sorted(doc["model"]["vocab"])[10]


TOKENIZER_DAMAGE = {  # tokenizers raises each as a bare Exception (serde's message)
    "vocab entry a list": lambda d: d["model"]["vocab"].update({_vocab_entry(d): [1]}),
    "vocab entry a map": lambda d: d["model"]["vocab"].update(unknown={"a": 1}),
    "vocab entry -inf": lambda d: d["model"]["vocab"].update({_vocab_entry(d): -math.inf}),  # json writes -Infinity
    "not JSON": lambda d: json.dumps(d)[:-10],
}


@pytest.mark.parametrize("source", ["hf", "quantized"])
@pytest.mark.parametrize("case", list(TOKENIZER_DAMAGE))
def test_damaged_tokenizer_json_is_one_error(case, source, good, tmp_path):
    folder = _copy(good / source, tmp_path / source)
    _edit_json(folder / "tokenizer.json", TOKENIZER_DAMAGE[case])
    text = _refusal(lambda: qbara.load_model(str(folder)))
    assert str(folder / "tokenizer.json") in text and "copy the base model's tokenizer files" in text, text


def test_damaged_tokenizer_json_on_the_cli_is_one_line(good, tmp_path, capsys):
    folder = _copy(good / "quantized", tmp_path / "q")
    _edit_json(folder / "tokenizer.json", TOKENIZER_DAMAGE["vocab entry a list"])
    capsys.readouterr()
    rc = main(_eval_model(folder))
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "tokenizer.json" in err, err


@pytest.mark.parametrize("values, message", [
    ({"model_max_length": "2048"}, "model_max_length is '2048', it must be a positive number"),
    ({"model_max_length": -1}, "model_max_length is -1, it must be a positive number"),
    ({"model_max_length": True}, "model_max_length is True, it must be a positive number"),
    ({"clean_up_tokenization_spaces": "no"}, "clean_up_tokenization_spaces is 'no', it must be true or false"),
    ({"padding_side": 1}, "padding_side is 1, it must be 'left' or 'right'"),
])
def test_tokenizer_config_values_are_checked(values, message, good, tmp_path):
    folder = _copy(good / "hf", tmp_path / "hf")
    _edit_json(folder / "tokenizer_config.json", lambda d: d.update(values))
    text = _refusal(lambda: qbara.load_model(str(folder)))
    assert str(folder / "tokenizer_config.json") in text and message in text, text


def test_tokenizer_config_large_model_max_length_is_kept(good, tmp_path):
    folder = _copy(good / "hf", tmp_path / "hf")  # transformers' "no limit" value, as many Hub folders hold it
    _edit_json(folder / "tokenizer_config.json", lambda d: d.update(model_max_length=1000000000000000019884624838656))
    _, tokenizer = qbara.load_model(str(folder))
    assert tokenizer("Hello").input_ids


def test_tokenizer_file_that_is_a_fifo_is_refused(good, tmp_path):
    import os

    folder = _copy(good / "hf", tmp_path / "hf")
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")  # reading it would block for ever
    text = _refusal(lambda: qbara.load_model(str(folder)))
    assert "tokenizer.json" in text and "not a regular file" in text, text


@pytest.mark.parametrize("damage", ["folder", "symlink to /dev/urandom"])
def test_native_tokenizer_config_not_a_file_is_refused_not_skipped(damage, good, tmp_path, capsys):
    folder = _copy(good / "quantized", tmp_path / "q")  # it loaded without a tokenizer, then eval failed on None
    (folder / "tokenizer_config.json").unlink()
    if damage == "folder":
        (folder / "tokenizer_config.json").mkdir()
    else:
        (folder / "tokenizer_config.json").symlink_to("/dev/urandom")
    text = _refusal(lambda: qbara.load_model(str(folder)))
    assert str(folder / "tokenizer_config.json") in text, text
    capsys.readouterr()
    rc = main(_eval_model(folder))
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "tokenizer_config.json" in err, err


# ---------------------------------------------------------------- models.sources.checkpoint_file_budget


def test_checkpoint_file_budget_checks_the_folder(good, tmp_path):
    from qbara.models.sources import checkpoint_file_budget

    folder = _folder_with(tmp_path, good, "hf", {"rms_norm_eps": math.nan})
    text = _refusal(lambda: checkpoint_file_budget(folder))
    assert "rms_norm_eps is nan" in text and "config.json" in text, text
    folder = _folder_with(tmp_path / "b", good, "hf", {"mlp_bias": 2**63})
    text = _refusal(lambda: checkpoint_file_budget(folder))
    assert "mlp_bias" in text, text


@pytest.mark.parametrize("values, field", [({"rms_norm_eps": math.nan}, "rms_norm_eps is nan"),
                                           ({"mlp_bias": 2**63}, "mlp_bias")])
def test_a_gguf_mix_checks_the_folder_before_building_anything(values, field, good, tmp_path):
    """write_mixed_gguf streams through models.sources like LQ-LoRA: the folder is checked first."""
    from qbara.export.gguf.mix import write_mixed_gguf

    folder = _folder_with(tmp_path, good, "hf", values)
    text = _refusal(lambda: write_mixed_gguf(folder, tmp_path / "mix.gguf", bits=6.0, costs="plain", progress=False))
    assert field in text and "config.json" in text, text
    assert not (tmp_path / "mix.gguf").exists()


# ---------------------------------------------------------------- run config: every field typed


def test_truncated_yaml_with_an_empty_key_is_refused(good, tmp_path):
    path = _yaml(tmp_path, good, steps=3)
    text = path.read_text()
    path.write_text(text[:text.index("steps:") + len("steps:")] + "\n")  # the fuzz case yaml:302: cut after a key
    message = _refusal(lambda: load_run_config(str(path)))
    assert "train.steps" in message and "empty" in message, message


@pytest.mark.parametrize("key, value, message", [
    ("train.steps", None, "train.steps is empty"),
    ("train.lr", None, "train.lr is empty"),
    ("data.train", None, "data.train is empty"),
    ("train.progress", None, "train.progress is empty"),
    ("train.progress", 2147483648, "train.progress: 2147483648 is not a valid bool"),
    ("train.bf16", "maybe", "train.bf16: 'maybe' is not a valid bool"),
    ("train.steps", True, "train.steps: True is not a valid int"),
    ("train.steps", 2.5, "train.steps: 2.5 is not a valid int"),
    ("train.steps", [3], "train.steps: [3] is not a valid int"),
    ("train.lr", False, "train.lr: False is not a valid float"),
    ("train.lr", {"a": 1}, "train.lr: {'a': 1} is not a valid float"),
    pytest.param("train.lr", 10**400, "train.lr: 1000000000", id="lr-10**400"),
    ("train.output_dir", ["a"], "train.output_dir: ['a'] is not a valid str"),
    ("model.name", True, "model.name: True is not a valid str"),
    ("data.format", {"x": 1}, "data.format: {'x': 1} is not a valid str"),
])
def test_run_config_field_types(key, value, message):
    with pytest.raises(QbaraError) as info:
        build_config({}, {key: value})
    assert message in str(info.value) and len(str(info.value)) < 300, info.value


def test_run_config_coercions_kept():
    config = build_config({"train": {"lr": "1e-4", "steps": 10.0, "progress": 0, "bf16": "yes"},
                           "data": {"train": 2024}, "model": {"name": "tiny-llama"}},
                          {"train.seed": "7", "train.epochs": 0})
    t = config.train
    assert (t.lr, t.steps, t.progress, t.bf16, t.seed, config.data.train) == (1e-4, 10, False, True, 7, "2024")
    assert isinstance(t.steps, int) and isinstance(t.epochs, float)


def test_empty_run_config_key_on_the_cli_is_one_line(good, tmp_path, capsys):
    path = _yaml(tmp_path, good)
    path.write_text(path.read_text().replace("steps: 1", "steps:"))
    capsys.readouterr()
    rc = main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "train.steps" in err, err
