"""Files written by an earlier qbara (tests/fixtures/compat-*, made by scripts/make_compat_fixtures.py with that
version) load bit for bit: the same logits and the same digest of every tensor and packed buffer as that version
read back from them."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = sorted((ROOT / "tests" / "fixtures").glob("compat-*"))


def _maker():
    spec = importlib.util.spec_from_file_location("make_compat_fixtures", ROOT / "scripts" / "make_compat_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()
CASES = [(folder, name) for folder in FIXTURES
         for name in json.loads((folder / "expected.json").read_text())["digests"]]


def test_fixtures_exist_and_every_artifact_has_a_loader():
    assert FIXTURES, "no tests/fixtures/compat-* folder"
    assert {name for _, name in CASES} <= set(MAKER.LOADERS)


@pytest.mark.parametrize("folder,name", CASES, ids=[f"{f.name}/{n}" for f, n in CASES])
def test_earlier_output_loads_bit_for_bit(folder, name, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)  # loading must not depend on (or touch) the repository's copy
    recorded = json.loads((folder / "expected.json").read_text())
    assert MAKER.IDS.tolist() == recorded["ids"]
    model = MAKER.LOADERS[name](copy)
    assert MAKER.digest(model) == recorded["digests"][name]
    assert torch.equal(MAKER.logits(model), load_file(str(folder / "expected.safetensors"))[name])
