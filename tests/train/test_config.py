import pytest

from qbara.errors import QbaraError
from qbara.train.config import build_config, load_run_config


def test_yaml_values_and_overrides_are_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-llama\ntrain: {lr: 1e-4, steps: 5}\nquant: {format: int4}\n")
    config = load_run_config(str(path), {"adapter.method": "qahira", "batch_size": "3"})
    assert config.model.name == "tiny-llama"
    assert config.train.lr == 1e-4 and config.train.steps == 5 and config.train.batch_size == 3
    assert config.quant_config().block_size == 32  # INT default group
    assert config.adapter_config().method == "qahira"


@pytest.mark.parametrize("overrides,message", [
    ({"train.lrr": 1}, "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ({"batchsize": 1}, "did you mean 'batch_size'"),
    ({"train.steps": "many"}, "train.steps: 'many' is not a valid int"),
    ({"adapter.method": "lorra"}, "did you mean 'lora'"),
    ({"data.format": "xml"}, "data.format 'xml'"),
])
def test_bad_keys_and_values_get_one_clear_message(overrides, message):
    with pytest.raises(QbaraError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config({}, overrides)


def test_unknown_section_and_missing_file(tmp_path):
    with pytest.raises(QbaraError, match="unknown config section 'trian'; did you mean 'train'"):
        build_config({"trian": {"lr": 1}})
    with pytest.raises(QbaraError, match="config file .* not found"):
        load_run_config(str(tmp_path / "nope.yaml"))
