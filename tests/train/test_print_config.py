"""`qbara train --print-config` and docs/config.md come from the config classes' own field docs."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from qbara.cli import main
from qbara.options import field_doc
from qbara.train.config import _FREE_SECTIONS, _SECTIONS, ALIASES, build_config, valid_keys
from qbara.train.config_reference import config_options, config_reference_markdown
from qbara.train.foreign_keys import UNSUPPORTED

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


@pytest.mark.parametrize("cls", [*_SECTIONS.values(), *_FREE_SECTIONS.values()], ids=lambda c: c.__name__)
def test_every_config_field_has_a_one_line_doc(cls):
    missing = [f.name for f in dataclasses.fields(cls) if not field_doc(f).strip()]
    assert not missing, f"{cls.__name__}: give {missing} a doc with qbara.options.option(default, doc)"
    assert all("\n" not in field_doc(f) for f in dataclasses.fields(cls))


def _printed(capsys, argv) -> tuple[dict, str]:
    assert main(["train", "--print-config", *argv]) == 0
    text = capsys.readouterr().out
    return yaml.safe_load(text), text


def test_print_config_lists_every_key_with_its_default_and_doc(capsys):
    printed, text = _printed(capsys, [])
    assert [f"{s}.{k}" for s, keys in printed.items() for k in keys] == [f"{o.section}.{o.name}" for o in
                                                                        config_options()]
    assert sorted(valid_keys()) == sorted(f"{s}.{k}" for s, keys in printed.items() for k in keys)
    for option in config_options():
        assert printed[option.section][option.name] == (list(option.value) if isinstance(option.value, tuple)
                                                        else option.value)
        assert f"# {option.doc}\n" in text


def test_printed_config_is_a_run_config_that_resolves_to_the_same(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-llama\nquant: {format: int4}\nadapter: {method: qahira, rank: 4}\n"
                    "train: {lr: 1e-4, epochs: 2}\n")
    printed, text = _printed(capsys, ["--config", str(path), "--data.max_length", "64"])
    config = build_config(yaml.safe_load(path.read_text()), {"data.max_length": 64})
    assert printed["quant"]["block_size"] == 32 and printed["quant"]["double_quant"] is False  # int4's resolved
    assert (printed["model"]["name"], printed["train"]["lr"], printed["train"]["steps"]) == ("tiny-llama", 1e-4, -1)
    assert printed["data"]["max_length"] == 64 and printed["adapter"]["rank"] == 4
    again = tmp_path / "printed.yaml"
    again.write_text(text)
    assert main(["train", "--print-config", "--config", str(again)]) == 0
    assert capsys.readouterr().out == text
    assert config_options(build_config(printed)) == config_options(config)


def test_docs_config_md_is_generated_from_the_classes():
    assert DOCS.read_text() == config_reference_markdown(), "run: python3 scripts/config_reference.py"


def test_reference_names_every_key_alias_and_refused_key():
    text = config_reference_markdown()
    for name in [*valid_keys(), *ALIASES, *UNSUPPORTED]:
        assert f"`{name}`" in text


def test_a_method_preset_from_the_yaml_and_the_command_line_resolves_to_its_knobs(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-llama\nquant: {format: int4, block_size: 4, block_rows: 8}\n"
                    "adapter: {method: qahira, rank: 4, preset: authors}\n")
    printed, _ = _printed(capsys, ["--config", str(path)])
    assert (printed["adapter"]["preset"], printed["adapter"]["pool_in"], printed["adapter"]["pool_out"]) == \
        ("authors", 4, 8)
    path.write_text("model: tiny-llama\nadapter: {method: qahira, rank: 4}\n")
    printed, _ = _printed(capsys, ["--config", str(path), "--adapter.preset", "authors"])
    assert (printed["adapter"]["pool_in"], printed["adapter"]["pool_out"]) == (4, 8)
