"""Issue #26, configs and weights files: a model config with values that would compute NaN or divide by zero, a
run config that writes a key twice or a seed numpy cannot take, a negative adapter alpha, a damaged
model.safetensors and an adapter folder passed as a model are each one QbaraError (CLI: exit 2, one line)."""
import json
import math
import random
import struct
from pathlib import Path

import pytest

import qbara
from qbara import AdapterConfig
from qbara.cli import main
from qbara.errors import QbaraError
from qbara.train.config import build_config, load_run_config
from tests import test_hardening
from tests.test_hardening import QUANT, _check_one_line, _copy, _edit_json, _eval_model, _train

good = test_hardening.good  # the fixture: a tiny HF folder, an adapter, a native quantized folder, a tiny GGUF

# ---------------------------------------------------------------- model config values (cases 1 and 2)

# config.json edit -> the key and value the refusal names
BAD_VALUES = {
    "rms_norm_eps NaN": ({"rms_norm_eps": math.nan}, "rms_norm_eps is nan"),
    "rms_norm_eps -1": ({"rms_norm_eps": -1}, "rms_norm_eps is -1"),
    "rms_norm_eps 0": ({"rms_norm_eps": 0.0}, "rms_norm_eps is 0.0"),
    "rope_theta inf": ({"rope_theta": math.inf}, "rope_theta is inf"),
    "rope_theta negative": ({"rope_theta": -10000.0}, "rope_theta is -10000.0"),
    "rope factor 0": ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, "factor is 0.0"),
    "initializer_range NaN": ({"initializer_range": math.nan}, "initializer_range is nan"),
    "partial_rotary_factor 2": ({"partial_rotary_factor": 2.0}, "partial_rotary_factor is 2.0"),
    "num_attention_heads 0": ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    "num_key_value_heads 0": ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    "head_dim -8": ({"head_dim": -8}, "head_dim is -8"),
    "max_position_embeddings 0": ({"max_position_embeddings": 0}, "max_position_embeddings is 0"),
    "hidden not divisible": ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
                             "not divisible by num_attention_heads 3"),
    "heads not divisible by kv": ({"num_key_value_heads": 3}, "not divisible by num_key_value_heads 3"),
}


def _hf_with(tmp: Path, good: Path, values: dict, source: str = "hf") -> Path:
    folder = _copy(good / source, tmp / f"bad-{source}")
    _edit_json(folder / "config.json", lambda d: d.update(values))
    return folder


def _assert_refused(call, message: str):
    with pytest.raises(QbaraError) as info:
        call()
    text = str(info.value)
    assert message in text and "config is damaged" in text and "config.json" in text, text


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_hf_folder_config_value_is_refused(case, good, tmp_path):
    values, message = BAD_VALUES[case]
    folder = _hf_with(tmp_path, good, values)
    _assert_refused(lambda: qbara.load_model(str(folder)), message)


@pytest.mark.parametrize("case", ["rms_norm_eps NaN", "num_attention_heads 0", "num_key_value_heads 0"])
def test_quantize_on_load_config_value_is_refused(case, good, tmp_path):
    values, message = BAD_VALUES[case]
    folder = _hf_with(tmp_path, good, values)
    _assert_refused(lambda: qbara.load_model(str(folder), quant=QUANT), message)


def test_stream_load_checks_the_config_itself(good, tmp_path):
    from qbara.models.streaming import load_quantized_stream

    folder = _hf_with(tmp_path, good, {"rms_norm_eps": math.nan})
    _assert_refused(lambda: load_quantized_stream(folder, QUANT), "rms_norm_eps is nan")


@pytest.mark.parametrize("case", ["rms_norm_eps NaN", "rms_norm_eps -1", "num_attention_heads 0"])
def test_native_quantized_folder_config_value_is_refused(case, good, tmp_path):
    values, message = BAD_VALUES[case]
    folder = _hf_with(tmp_path, good, values, source="quantized")
    _assert_refused(lambda: qbara.load_model(str(folder)), message)


def test_sensible_values_still_load(good, tmp_path):
    folder = _hf_with(tmp_path, good, {"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "initializer_range": 0.0,
                                       "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    model, _ = qbara.load_model(str(folder))
    assert model.config.rms_norm_eps == 1e-5


def test_eval_with_nan_eps_is_one_line_not_inf(good, tmp_path, capsys):
    folder = _hf_with(tmp_path, good, {"rms_norm_eps": math.nan})
    rc = main(_eval_model(folder))
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "rms_norm_eps is nan" in err, err


def test_train_with_negative_eps_saves_nothing(good, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _hf_with(tmp_path, good, {"rms_norm_eps": -1.0})  # trained to an all-NaN adapter, "train_loss 0"
    rc = main(_train(tmp_path, good, "--model.name", str(folder)))
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "rms_norm_eps is -1.0, it must be a finite number in (0, 1)" in err, err
    assert not (tmp_path / "out" / "adapter").exists()


# ---------------------------------------------------------------- GGUF metadata values


def _gguf_with(tmp: Path, good: Path, key: str, value) -> Path:
    """A copy of the tiny GGUF with one numeric metadata value rewritten in place."""
    from gguf import GGUFReader

    path = _copy(good / "tiny.gguf", tmp / "m.gguf")
    reader = GGUFReader(str(path), "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader
    return path


GGUF_CASES = {
    "head_count 0": ("llama.attention.head_count", 0, "num_attention_heads is 0"),
    "head_count_kv 0": ("llama.attention.head_count_kv", 0, "num_key_value_heads is 0"),
    "rms eps NaN": ("llama.attention.layer_norm_rms_epsilon", math.nan, "rms_norm_eps is nan"),
}


@pytest.mark.parametrize("quant", [None, QUANT], ids=["dense", "quant-on-load"])
@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_metadata_value_is_refused(case, quant, good, tmp_path):
    key, value, message = GGUF_CASES[case]
    path = _gguf_with(tmp_path, good, key, value)
    with pytest.raises(QbaraError) as info:
        qbara.load_model(str(path), quant=quant)
    assert message in str(info.value) and str(path) in str(info.value), info.value
    assert "config is damaged" in str(info.value)


def test_gguf_head_count_zero_through_the_cli(good, tmp_path, capsys):
    path = _gguf_with(tmp_path, good, "llama.attention.head_count", 0)
    rc = main(_eval_model(path))
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "num_attention_heads is 0" in err, err


# ---------------------------------------------------------------- run configs (cases 3 and 4)


def test_seed_past_32_bits_is_refused():
    with pytest.raises(QbaraError, match=r"train.seed must be in \[0, 2\*\*32\)"):
        build_config({"train": {"seed": 2**70}})
    with pytest.raises(QbaraError, match=r"train.seed must be in \[0, 2\*\*32\)"):
        build_config({"train": {"seed": 2**32}})
    assert build_config({"train": {"seed": 2**32 - 1}}).train.seed == 2**32 - 1


def test_seed_past_32_bits_through_the_cli(good, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(_train(tmp_path, good, seed=2**70))
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "train.seed must be in [0, 2**32)" in err, err


def test_duplicate_yaml_key_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  steps: 2\n  lr: 5\n")
    with pytest.raises(QbaraError) as info:
        load_run_config(str(path))
    assert str(info.value) == (f"{path}: the key 'lr' is written twice (lines 2 and 4); YAML would keep the last "
                               f"one silently: keep one")


def test_duplicate_yaml_section_and_flow_key_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {steps: 1}\nadapter: {rank: 4}\ntrain: {steps: 2}\n")
    with pytest.raises(QbaraError, match=r"the key 'train' is written twice \(lines 1 and 3\)"):
        load_run_config(str(path))
    path.write_text("adapter: {rank: 4, rank: 8}\n")
    with pytest.raises(QbaraError, match=r"the key 'rank' is written twice \(lines 1 and 1\)"):
        load_run_config(str(path))


def test_duplicate_yaml_key_through_the_cli(good, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (f"model: tiny-llama\ndata: {{train: {good / 'data.jsonl'}}}\n"
            f"train: {{output_dir: {tmp_path / 'out'}, steps: 1, progress: false}}\nmodel: tiny-qwen2\n")
    rc = main(_train(tmp_path, good, text=text))
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "the key 'model' is written twice (lines 1 and 4)" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- adapter alpha (case 5)


@pytest.mark.parametrize("alpha", [-8, -0.5, 0, math.nan, math.inf])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(QbaraError, match="alpha must be a finite number > 0"):
        AdapterConfig("lora", rank=4, alpha=alpha)


def test_negative_alpha_in_a_saved_adapter_is_refused(good, tmp_path):
    folder = _copy(good / "adapter", tmp_path / "adapter")
    _edit_json(folder / "qbara_adapter.json", lambda d: d["adapter"].update(alpha=-8.0))
    model, _ = qbara.load_model("tiny-llama")
    with pytest.raises(QbaraError) as info:
        qbara.load_adapter(model, folder)
    assert "qbara_adapter.json" in str(info.value) and "alpha must be a finite number > 0" in str(info.value)


# ---------------------------------------------------------------- damaged model.safetensors (case 6)


def _zero_bytes(path: Path):
    path.write_bytes(b"")


def _cut(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random(path: Path):
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


DAMAGE = {"zero bytes": (_zero_bytes, "too short to be safetensors"), "truncated": (_cut, "truncated"),
          "random bytes": (_random, "model.safetensors")}


def _damaged_hf(tmp: Path, good: Path, damage: str) -> Path:
    folder = _copy(good / "hf", tmp / "hf")
    DAMAGE[damage][0](folder / "model.safetensors")
    return folder


def _commands(folder: Path, tmp: Path, good: Path) -> dict[str, list[str]]:
    return {"eval": _eval_model(folder),
            "eval --adapter": [*_eval_model(folder), "--adapter", str(good / "adapter")],
            "merge": ["merge", "--model", str(folder), "--adapter", str(good / "adapter"), "--out", str(tmp / "m")],
            "export": ["export", "--model", str(folder), "--out", str(tmp / "x.gguf")],
            "train": _train(tmp, good, "--model.name", str(folder))}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", ["eval", "eval --adapter", "merge", "export", "train"])
def test_damaged_weights_through_the_cli(command, damage, good, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _damaged_hf(tmp_path, good, damage)
    rc = main(_commands(folder, tmp_path, good)[command])
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert str(folder / "model.safetensors") in err and DAMAGE[damage][1] in err, err


@pytest.mark.parametrize("quant", [None, QUANT], ids=["dense", "quant-on-load"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_weights_through_load_model(damage, quant, good, tmp_path):
    folder = _damaged_hf(tmp_path, good, damage)
    with pytest.raises(QbaraError) as info:
        qbara.load_model(str(folder), quant=quant)
    assert str(folder / "model.safetensors") in str(info.value) and DAMAGE[damage][1] in str(info.value)


def _unknown_dtype(path: Path):
    """A header that fits the file but names a dtype safetensors does not know (its own parser refuses it)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header[next(k for k in header if k != "__metadata__")]["dtype"] = "X9"
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


@pytest.mark.parametrize("quant", [None, QUANT], ids=["dense", "quant-on-load"])
def test_header_safetensors_itself_refuses(quant, good, tmp_path):
    folder = _copy(good / "hf", tmp_path / "hf")
    _unknown_dtype(folder / "model.safetensors")
    with pytest.raises(QbaraError, match="SafetensorError|not a readable safetensors file") as info:
        qbara.load_model(str(folder), quant=quant)
    assert str(folder) in str(info.value)


def _sharded(tmp: Path, good: Path) -> Path:
    """The tiny HF folder saved as two shards and an index."""
    model, tok = qbara.load_model(str(good / "hf"))
    folder = tmp / "sharded"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    tok.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.parametrize("quant", [None, QUANT], ids=["dense", "quant-on-load"])
def test_damaged_shard_and_index(quant, good, tmp_path):
    folder = _sharded(tmp_path, good)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].write_bytes(b"")
    with pytest.raises(QbaraError, match="too short to be safetensors"):
        qbara.load_model(str(folder), quant=quant)
    shards[-1].unlink()
    with pytest.raises(QbaraError, match=r"named by model.safetensors.index.json are missing"):
        qbara.load_model(str(folder), quant=quant)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x"}}))
    with pytest.raises(QbaraError, match="not a safetensors index"):
        qbara.load_model(str(folder), quant=quant)


# ---------------------------------------------------------------- an adapter folder as the model (case 7)


@pytest.mark.parametrize("quant", [None, QUANT], ids=["dense", "quant-on-load"])
def test_adapter_folder_as_model(quant, good):
    with pytest.raises(QbaraError) as info:
        qbara.load_model(str(good / "adapter"), quant=quant)
    assert str(info.value) == (f"{str(good / 'adapter')!r} is an adapter folder, not a model: load its base and "
                               f"pass the adapter (qbara.load_model(base); qbara.load_adapter(model, dir) / "
                               f"--adapter)")


def test_negative_lora_alpha_in_a_peft_adapter_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = qbara.load_model("tiny-llama")
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=-8, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "peft")
    model, _ = qbara.load_model("tiny-llama")
    with pytest.raises(QbaraError) as info:
        qbara.load_adapter(model, tmp_path / "peft")
    assert str(info.value) == (f"{tmp_path / 'peft' / 'adapter_config.json'}: r=4 and lora_alpha=-8 must be a "
                               f"positive integer and a finite number > 0")
