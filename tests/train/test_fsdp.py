import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from qbara import load_model, prepare
from qbara.adapters.config import AdapterConfig
from qbara.errors import QbaraError
from qbara.models import tiny_llama
from qbara.nn.quantized_linear import QuantizedLinear
from qbara.quant.config import QuantConfig
from qbara.train.fsdp import fsdp_choice, fsdp_mode
from tests.helpers import free_port, randomize_adapters
from tests.train.fsdp_load_worker import run as load_worker
from tests.train.fsdp_worker import run as shard_worker
from tests.train.test_trainer import ENV, _config


def _prepared():
    model = prepare(tiny_llama()[0], QuantConfig("nf4", block_size=64), AdapterConfig(method="lora", rank=4))
    randomize_adapters(model)
    return model


def test_packed_as_parameters_keeps_state_dict_and_outputs():
    model = _prepared()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before, state = model(input_ids=ids).logits, model.state_dict()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.packed_as_parameters()
            assert not list(module.buffers()) and not any(p.requires_grad for p in module.parameters())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(model(input_ids=ids).logits, before)


def test_two_ranks_hold_half_the_packed_bytes_and_compute_the_unsharded_model(tmp_path):
    mp.spawn(shard_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = _prepared()
    total = sum(m.nbytes for m in reference.modules() if isinstance(m, QuantizedLinear))
    assert ranks[0]["total"] == ranks[1]["total"] == total
    assert ranks[0]["local"] + ranks[1]["local"] == total  # the shards partition the packed storage
    for r in ranks:
        assert r["local"] == pytest.approx(total / 2, rel=0.02)
    # the dense reference: the same model in one process, on both ranks' inputs (gradient: their mean)
    losses = []
    for r in ranks:
        logits = reference(input_ids=r["ids"]).logits
        torch.testing.assert_close(r["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
        losses.append(logits.float().square().mean())
    (sum(losses) / 2).backward()
    for name, param in reference.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(ranks[0]["grads"][name], param.grad, rtol=1e-4, atol=1e-7)


def _launch(args, timeout=600):
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def _write(tmp_path, out, batch, evaluate=False, **train):
    import yaml

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(600)))
    # max_grad_norm below the gradients' norm (~0.2): clipping, over the sharded gradients, is part of the comparison
    c = _config(tmp_path, out=out, batch_size=batch, save_steps=2, max_grad_norm=0.05, **train)
    c["data"] = {"train": str(text), "format": "text", "max_length": 64, **({"eval": str(text)} if evaluate else {})}
    if evaluate:  # evaluation (a forward of the sharded model) and recomputed activations on the way
        c["train"].update(eval_steps=2, gradient_checkpointing=True)
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(c))
    return path


def _torchrun(config, *extra):
    return _launch(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "-m", "qbara", "train", "--config", str(config), *extra])


def _adapter(folder):
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_fsdp_training_matches_one_process_resumes_merges_and_exports(tmp_path):
    single = _launch(["-m", "qbara", "train", "--config", str(_write(tmp_path, "single", 4, True, steps=4))])
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    sharded = _torchrun(_write(tmp_path, "fsdp", 2, True, steps=4, fsdp="full_shard"))
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-3000:]
    a, b = _adapter(tmp_path / "single"), _adapter(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for key in a:
        assert ((b[key] - a[key]).norm() / a[key].norm()).item() < 1e-4, key
    for key in ("loss", "eval_loss"):
        curves = {name: [h[key] for h in json.loads((tmp_path / name / "log_history.json").read_text()) if key in h]
                  for name in ("single", "fsdp")}
        assert len(curves["single"]) >= 3 and curves["fsdp"] == pytest.approx(curves["single"], rel=1e-4), key

    # stop after 2 steps, then resume from the sharded checkpoint (adapter, optimizer, scheduler) to step 4
    first = _torchrun(_write(tmp_path, "resumed", 2, steps=2, fsdp="full_shard"))
    assert first.returncode == 0, first.stderr[-3000:]
    again = _torchrun(_write(tmp_path, "resumed", 2, steps=4, fsdp="full_shard", overwrite=True), "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stdout
    c = _adapter(tmp_path / "resumed")
    for key in b:
        assert ((c[key] - b[key]).norm() / b[key].norm()).item() < 1e-5, key

    # the sharded run's adapter merges and exports in one process like any adapter, to what the single run's gives
    for run in ("fsdp", "single"):
        for out, args in ((f"merged-{run}", ["merge", "--into", "quantized"]),
                          (f"{run}.gguf", ["export", "--format", "gguf"])):
            done = _launch(["-m", "qbara", *args, "--model", "tiny-llama", "--adapter", str(tmp_path / run / "adapter"),
                            "--out", str(tmp_path / out)])
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = [load_model(str(tmp_path / f"merged-{run}"))[0](input_ids=ids).logits for run in ("fsdp", "single")]
    torch.testing.assert_close(merged[0], merged[1], rtol=1e-4, atol=1e-4)
    assert (tmp_path / "fsdp.gguf").stat().st_size == (tmp_path / "single.gguf").stat().st_size > 0


@pytest.mark.parametrize("value, expected", [("full_shard", "full_shard"), ("full_shard auto_wrap", "full_shard"),
                                             (True, "full_shard"), ("", ""), (False, "")])
def test_fsdp_choice_reads_hf_naming(value, expected):
    assert fsdp_choice(value) == expected


@pytest.mark.parametrize("value", ["shard_grad_op", "hybrid_shard", "full_shard offload", "yes"])
def test_fsdp_choice_refuses_what_qbara_does_not_do(value):
    with pytest.raises(QbaraError, match="full_shard"):
        fsdp_choice(value)


@pytest.mark.parametrize("env", [{"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"},
                                 {"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"},
                                 {"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "1"}])
def test_an_accelerate_fsdp_launch_is_full_shard(monkeypatch, env):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert fsdp_mode("") == "full_shard"
    assert "ACCELERATE_USE_FSDP" not in os.environ  # accelerate's own FSDP path does not start as well


@pytest.mark.parametrize("env", [{"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"},
                                 {"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}])
def test_an_accelerate_config_qbara_cannot_follow_is_refused(monkeypatch, env):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(QbaraError, match="FULL_SHARD"):
        fsdp_mode("")


def test_without_an_accelerate_launch_the_config_decides(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_mode("full_shard") == "full_shard" and fsdp_mode("") == ""


def test_fsdp_in_one_process_is_refused_before_loading(tmp_path, monkeypatch):
    from qbara.train.config import build_config
    from qbara.train.trainer import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("qbara.train.trainer.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    config = build_config(_config(tmp_path, fsdp="full_shard"))
    with pytest.raises(QbaraError, match="torchrun"):
        train(config)


def test_an_accelerate_fsdp_launch_shards_the_base(tmp_path):
    accelerate_config = tmp_path / "fsdp.yaml"
    accelerate_config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                                 "num_processes: 2\nuse_cpu: true\nmixed_precision: 'no'\n"
                                 "fsdp_config: {fsdp_version: 2, fsdp_reshard_after_forward: true}\n")
    done = _launch(["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config), "--main_process_port",
                    str(free_port()), "-m", "qbara", "train", "--config", str(_write(tmp_path, "acc", 2, steps=1))])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FSDP full_shard over 2 ranks" in done.stdout
    assert (tmp_path / "acc" / "adapter" / "adapter_model.safetensors").exists()


def _llama_folder(path, tied: bool):
    """A random 8-layer LLaMA as an HF safetensors folder (bf16), read by the streaming load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=203, hidden_size=64, intermediate_size=192, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tiny_llama()[1].save_pretrained(path)  # a byte-level tokenizer: load_model reads one
    return str(path)


def test_rank_local_loading_holds_half_and_trains_as_the_whole_load(tmp_path):
    folders = [_llama_folder(tmp_path / "untied", False), _llama_folder(tmp_path / "tied", True)]
    mp.spawn(load_worker, args=(2, free_port(), folders, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for folder in folders:
        for r in ranks:
            whole, local = r[folder]["whole"], r[folder]["local"]
            # the same shards on this rank (packed codes, scales, dense weights, adapters), the same training
            assert whole["shards"].keys() == local["shards"].keys()
            for name, shard in whole["shards"].items():
                assert torch.equal(local["shards"][name], shard), name
            assert (local["local"], local["total"]) == (whole["local"], whole["total"])
            assert local["losses"] == whole["losses"]
            for name, value in whole["adapter"].items():
                assert torch.equal(local["adapter"][name], value), name
            # while loading: at most half of what the whole load holds, plus one decoder layer; the whole load
            # itself (the reference for the measure) holds more than that
            bound = whole["held_loading"] / 2 + whole["layer_bytes"]
            assert local["held_loading"] <= bound < whole["held_loading"], (local["held_loading"], bound)
