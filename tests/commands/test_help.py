"""Every verb and every flag of the `qbara` command line is documented in --help; `qbara --version` works."""
import argparse
import importlib.metadata

import pytest

import qbara
from qbara.cli import build_parser, main
from qbara.train.config import valid_keys


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers


def test_every_verb_has_a_help_line():
    subparsers = _verbs(build_parser())
    helped = {a.dest: a.help for a in subparsers._choices_actions}
    assert set(helped) == set(subparsers.choices)
    assert all(helped.values()), [v for v, h in helped.items() if not h]


def test_every_flag_of_every_verb_has_help():
    parser = build_parser()
    undocumented = [("qbara", a.dest) for a in parser._actions if not a.help]
    for verb, sub in _verbs(parser).choices.items():
        undocumented += [(verb, a.option_strings or a.dest) for a in sub._actions
                         if not a.help or a.help == argparse.SUPPRESS]
    assert not undocumented


@pytest.mark.parametrize("verb", sorted(_verbs(build_parser()).choices))
def test_help_renders(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: qbara {verb}")


def test_version(capsys):
    try:
        expected = importlib.metadata.version("qbara")
    except importlib.metadata.PackageNotFoundError:
        expected = qbara.__version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"qbara {expected}\n"


def test_train_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for section in ("model", "quant", "adapter", "data", "train"):
        listed = text.split(f"{section}: ", 1)[1].split(";", 1)[0].split(".", 1)[0]
        names = [k.split(".", 1)[1] for k in valid_keys() if k.startswith(f"{section}.")]
        assert listed.split(", ") == names
