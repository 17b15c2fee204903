import json

import pytest
import torch

from qbara import QbaraError, load_adapter, save_adapter
from qbara.adapters import adapter_layers
from qbara.models import tiny_llama

from .conftest import SETTINGS, build, randomize_adapters


@torch.no_grad()
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_save_then_load_on_fresh_model_gives_identical_logits(setting, tmp_path, batch):
    model, _ = build("tiny-llama", setting)
    randomize_adapters(model, seed=11)
    expected = model(batch).logits
    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "qbara_adapter.json"]
    fresh, _ = tiny_llama(seed=0)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(batch).logits, expected)
    types = {n: type(m) for n, m in adapter_layers(model).items()}
    assert {n: type(m) for n, m in adapter_layers(fresh).items()} == types


def test_lora_adapter_config_is_peft_shaped(tmp_path):
    model, _ = build("tiny-llama", "lora")
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)


def test_load_onto_a_different_base_fails_clearly(tmp_path):
    model, _ = build("tiny-llama", "qahira", seed=0)
    save_adapter(model, tmp_path)
    other, _ = tiny_llama(seed=1)
    with pytest.raises(QbaraError, match="trained on a different base model"):
        load_adapter(other, tmp_path)


def test_missing_or_damaged_folder(tmp_path):
    model, _ = tiny_llama()
    with pytest.raises(QbaraError, match="does not exist"):
        load_adapter(model, tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(QbaraError, match="not valid JSON"):
        load_adapter(model, tmp_path)


def _saved(tmp_path, setting="lora"):
    model, _ = build("tiny-llama", setting)
    randomize_adapters(model, seed=3)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _rewrite_weights(folder, change, keep_digest=False):
    """Change the saved tensors; without keep_digest, as a writer that records no digest would."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))
    if not keep_digest:
        _rewrite_config(folder, lambda d: d["qbara"].pop("weights_sha256"))


def _rewrite_config(folder, change):
    """Change qbara's record, seen as the "qbara" section read_adapter_config returns."""
    path = folder / "qbara_adapter.json"
    data = {"qbara": json.loads(path.read_text())}
    change(data)
    path.write_text(json.dumps(data["qbara"]))


KEY = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"


@pytest.mark.parametrize("damage,message", [
    (lambda s: s[KEY].view(-1).__setitem__(3, float("nan")), "NaN or infinite"),
    (lambda s: s[KEY].view(-1).__setitem__(3, float("inf")), "NaN or infinite"),
    (lambda s: s[KEY].view(-1).__setitem__(3, 1e30), "beyond"),
    (lambda s: s.__setitem__(KEY, s[KEY].to(torch.int32)), "not a float type"),
    (lambda s: s.__setitem__(KEY, s[KEY] > 0), "not a float type"),
    (lambda s: s.__setitem__(KEY, s[KEY][:2]), "shape"),
    (lambda s: s.__setitem__("base_model.model.extra.lora_A.weight", torch.zeros(2, 2)), "does not describe"),
], ids=["nan", "inf", "huge", "int", "bool", "shape", "extra"])
def test_damaged_adapter_weights_are_refused(damage, message, tmp_path):
    folder = _saved(tmp_path)
    _rewrite_weights(folder, damage)
    with pytest.raises(QbaraError, match=message):
        load_adapter(tiny_llama(seed=0)[0], folder)


@pytest.mark.parametrize("damage,message", [
    (lambda d: d["qbara"]["adapter"].__setitem__("rank", True), "rank must be int, got True"),
    (lambda d: d["qbara"]["adapter"].__setitem__("rank", 10 ** 9), "rank must be a positive integer up to"),
    (lambda d: d["qbara"]["adapter"].__setitem__("alpha", "16"), "alpha must be int or float"),
    (lambda d: d["qbara"].__setitem__("layers", {}), "lists no adapted layers"),
    (lambda d: next(iter(d["qbara"]["layers"].values())).__setitem__("pool_in", True), "pool_in must be a positive"),
    (lambda d: next(iter(d["qbara"]["layers"].values()))["quant"].__setitem__("block_size", 32.0),
     "block_size must be int"),
], ids=["rank-bool", "rank-huge", "alpha-str", "no-layers", "pool-bool", "block-float"])
def test_damaged_adapter_configs_are_refused(damage, message, tmp_path):
    folder = _saved(tmp_path)
    _rewrite_config(folder, damage)
    with pytest.raises(QbaraError, match=message):
        load_adapter(tiny_llama(seed=0)[0], folder)


def test_swapped_adapter_tensors_are_found_by_the_recorded_digest(tmp_path):
    folder = _saved(tmp_path)
    other = KEY.replace("layers.1", "layers.0")

    def swap(state):
        state[KEY], state[other] = state[other].clone(), state[KEY].clone()

    _rewrite_weights(folder, swap, keep_digest=True)
    with pytest.raises(QbaraError, match="tensors differ from those written"):
        load_adapter(tiny_llama(seed=0)[0], folder)


def test_peft_reads_a_lora_adapter_without_warnings_and_merges_the_same_update(tmp_path, recwarn):
    """PEFT loads qbara's LoRA folder onto the dense base; its merged update equals qbara's dense delta."""
    peft = pytest.importorskip("peft")
    import logging

    model, _ = build("tiny-llama", "lora")
    randomize_adapters(model, seed=5)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "qbara" not in config
    dense, _ = tiny_llama(seed=0)
    weights = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("peft").addHandler(handler)
    try:
        peft_model = peft.PeftModel.from_pretrained(dense, str(tmp_path / "adapter"))
    finally:
        logging.getLogger("peft").removeHandler(handler)
    assert not [w for w in recwarn.list if "peft" in str(w.filename).lower() or "PEFT" in str(w.message)]
    assert not [r for r in records if r.levelno >= logging.WARNING]
    merged = peft_model.merge_and_unload()
    for name, layer in adapter_layers(model).items():
        update = merged.get_submodule(name).weight - weights[name]
        assert torch.allclose(update, layer.delta_weight().float(), atol=1e-6), name


def test_regex_targets_are_written_as_full_names(tmp_path):
    from qbara import AdapterConfig, QuantConfig, prepare

    model, _ = tiny_llama(seed=0)
    prepare(model, QuantConfig("nf4", 32), AdapterConfig("lora", rank=4, target_modules=r"model\.layers\.0\..*_proj"))
    save_adapter(model, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(adapter_layers(model)) and all(t.startswith("model.layers.0.") for t in targets)
    model, _ = build("tiny-llama", "lora")  # all layers: suffixes, as PEFT users write them
    save_adapter(model, tmp_path / "all")
    targets = json.loads((tmp_path / "all" / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_adapters_of_the_previous_layout_still_load(tmp_path, batch):
    model, _ = build("tiny-llama", "qahira")
    randomize_adapters(model, seed=2)
    expected = model(batch).logits.detach()
    folder = tmp_path / "old"
    save_adapter(model, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["qbara"] = json.loads((folder / "qbara_adapter.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "qbara_adapter.json").unlink()
    fresh, _ = tiny_llama(seed=0)
    load_adapter(fresh, folder)
    assert torch.equal(fresh(batch).logits, expected)
