"""`preset_types` / `preset_file` against llama.cpp's own quantizer: the per-tensor types and tensor bytes of the
files llama-cpp-python 0.3.36's `llama_model_quantize` wrote from qbara's F32 export of SmolLM2-135M (and Gemma 3
270M where recorded; recorded by bench/gguf_presets.py in tests/fixtures/llamacpp_presets.json; the models are rebuilt here
weightless from their configs)."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from qbara.errors import QbaraError
from qbara.export.gguf.presets import PRESETS, preset_file, preset_types
from qbara.models import tiny_llama
from qbara.models.streaming import empty_model

FIXTURE = json.loads((Path(__file__).parent.parent / "fixtures" / "llamacpp_presets.json").read_text())
CASES = [(model, preset) for model, entry in FIXTURE.items() for preset in entry["presets"]]
_DROP = ("architectures", "transformers_version", "dtype", "torch_dtype", "model_type", "_name_or_path")


def _skeleton(name):
    config = dict(FIXTURE[name]["config"])
    model_type = config["model_type"]
    config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k not in _DROP})
    model = empty_model(config, torch.float32)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


@pytest.mark.parametrize("model, preset", CASES)
def test_types_and_bytes_equal_llamacpp(model, preset):
    expected = FIXTURE[model]["presets"][preset]
    name, _, imatrix = preset.partition("+")
    skeleton = _skeleton(model)
    types = preset_types(skeleton, name, imatrix=bool(imatrix))
    want = {n: expected["others"].get(n, expected["default"]) for n in types}
    assert types == want
    assert preset_file(skeleton, name, imatrix=bool(imatrix)).tensor_bytes == expected["tensor_bytes"]


def test_fixture_covers_every_preset_and_mixes():
    for entry in FIXTURE.values():
        assert {p.partition("+")[0] for p in entry["presets"]} == set(PRESETS)
    assert any(len({*p["others"].values()} - {"f32"}) for e in FIXTURE.values() for p in e["presets"].values())


def test_unknown_preset_is_refused():
    with pytest.raises(QbaraError, match="unknown llama.cpp preset"):
        preset_types(tiny_llama()[0], "Q4_K_XL")
