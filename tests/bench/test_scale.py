"""bench/scale.py's streamed checkpoint generator: shards safetensors and transformers read back tensor for tensor,
resumed shard by shard; its memory cgroup's size parsing."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import scale  # noqa: E402


@pytest.fixture
def tiny_size(monkeypatch):
    monkeypatch.setitem(scale.SIZES, "tiny", (64, 128, 2, 4, 2, 300))
    monkeypatch.setattr(scale, "SHARD_BYTES", 40_000)  # several shards
    return "tiny"


def test_streamed_checkpoint_is_what_safetensors_and_transformers_read(tiny_size, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = scale.make_model(tiny_size, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    read = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            read.update({key: fh.get_tensor(key) for key in fh.keys()})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    state = model.state_dict()
    assert read.keys() == state.keys() and sum(t.numel() for t in read.values()) == scale.parameter_count(tiny_size)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in read.values())
    for key, tensor in read.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(state[key], tensor), key
        assert torch.equal(tensor, scale._random_tensor(key, tuple(tensor.shape))), key  # seeded by its name alone
    assert torch.equal(read["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert abs(read["model.layers.0.mlp.up_proj.weight"].float().std().item() - 0.02) < 2e-3


def test_generator_resumes_from_the_shards_already_written(tiny_size, tmp_path):
    folder = scale.make_model(tiny_size, tmp_path)
    first = {f.name: f.read_bytes() for f in folder.glob("model-*.safetensors")}
    (folder / "done").unlink()
    victim = sorted(first)[1]
    (folder / victim).unlink()
    kept = folder / sorted(first)[0]
    stamp = kept.stat().st_mtime_ns
    scale.make_model(tiny_size, tmp_path)
    assert {f.name: f.read_bytes() for f in folder.glob("model-*.safetensors")} == first
    assert kept.stat().st_mtime_ns == stamp  # not written again


def test_cgroup_limit_sizes():
    assert scale._bytes("16G") == 16 * 2 ** 30
    assert scale._bytes("512MiB") == 512 * 2 ** 20
    assert scale._bytes("1073741824") == 2 ** 30
