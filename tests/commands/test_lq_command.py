"""`qbara lq` writes a quantized base + adapters that reload to the step-0 model, and training starts from
them (`--model.adapter`); `adapter.init: loftq` in a run config trains and saves its base."""
import json

import pytest

from qbara.cli import main
from tests.commands.test_cli import _eval, _good_yaml
from tests.helpers import free_port

COMMON = ["--data", "shakespeare:hamlet", "--window", "64", "--max-tokens", "256", "--json"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))


def test_lq_command_outputs_reload_and_train(tmp_path, capsys):
    out = tmp_path / "lq"
    assert main(["lq", "--model", "tiny-llama", "--rank", "4", "--budget", "3.0", "--configs", "qlora",
                 "--table-iters", "2", "--out", str(out), "--eval", "shakespeare:hamlet", "--window", "64",
                 "--eval-tokens", "256"]) == 0
    data = json.loads((out / "allocation.json").read_text())
    assert data["bits_per_param"] <= 3.0 and data["budget"] == 3.0 and len(data["layers"]) == 14
    assert sum(data["counts"].values()) == 14
    assert (out / "bits_per_layer.png").stat().st_size > 5000
    # The saved base + adapter reproduce the step-0 model evaluated by the command.
    step0 = _eval(["--model", str(out / "model"), "--adapter", str(out / "adapter"), *COMMON], capsys)
    assert step0 == pytest.approx(data["eval"]["step0"]["ppl"], rel=1e-5)
    assert main(["train", "--config", str(_good_yaml(tmp_path)), "--model.name", str(out / "model"),
                 "--model.adapter", str(out / "adapter")]) == 0
    trained = _eval(["--model", str(out / "model"), "--adapter", str(tmp_path / "out" / "adapter"), *COMMON], capsys)
    assert trained != step0


def test_loftq_run_config_saves_its_base(tmp_path, capsys):
    yaml_path = _good_yaml(tmp_path)
    assert main(["train", "--config", str(yaml_path), "--quant.format", "nf4", "--quant.block_size", "32",
                 "--adapter.method", "lora", "--adapter.init", "loftq"]) == 0
    run = tmp_path / "out"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run / "base")
    assert _eval(["--model", str(run / "base"), "--adapter", str(run / "adapter"), *COMMON], capsys) > 1
    assert main(["eval", "--model", "tiny-llama", "--adapter", str(run / "adapter"), *COMMON]) == 2
    assert "decomposition" in capsys.readouterr().err


def test_lq_command_refuses_fisher_with_loftq(tmp_path, capsys):
    assert main(["lq", "--model", "tiny-llama", "--method", "loftq", "--fisher-data", "shakespeare:hamlet",
                 "--out", str(tmp_path / "x")]) == 2
    assert "no Fisher-weighted variant" in capsys.readouterr().err


def test_lq_command_refuses_patience_with_loftq(tmp_path, capsys):
    assert main(["lq", "--model", "tiny-llama", "--method", "loftq", "--patience", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--patience stops LQ-LoRA's decompositions" in capsys.readouterr().err


def test_lq_command_weighted_rounding_needs_gguf_configs_and_a_fisher(tmp_path, capsys):
    assert main(["lq", "--model", "tiny-llama", "--weighted-rounding", "--fisher-data", "shakespeare:hamlet",
                 "--out", str(tmp_path / "x")]) == 2
    assert "add --configs gguf" in capsys.readouterr().err
    assert main(["lq", "--model", "tiny-llama", "--weighted-rounding", "--configs", "gguf",
                 "--out", str(tmp_path / "x")]) == 2
    assert "add --fisher-data" in capsys.readouterr().err


def test_lq_command_under_torchrun_matches_one_process(tmp_path):
    """2 gloo ranks share the table and the decompositions out; rank 0 writes the same outputs as 1 process."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "QBARA_CACHE": str(tmp_path / "cache")}
    args = ["lq", "--model", "tiny-llama", "--rank", "4", "--budget", "3.0", "--configs", "qlora",
            "--table-iters", "2", "--max-iters", "4"]
    outs = {}
    for label, launcher in (("one", [sys.executable, "-m", "qbara"]),
                            ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--master_port", str(free_port()), "-m", "qbara"])):
        outs[label] = tmp_path / label
        env["QBARA_CACHE"] = str(tmp_path / f"cache-{label}")  # no shared table cache between the runs
        done = subprocess.run([*launcher, *args, "--out", str(outs[label])], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one, two = (json.loads((outs[k] / "allocation.json").read_text()) for k in ("one", "two"))
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["layers"] == two["layers"] and one["total_error"] == two["total_error"]
    for sub in ("model", "adapter"):
        files = sorted(p.name for p in (outs["one"] / sub).glob("*.safetensors"))
        assert files
        for name in files:
            a, b = load_file(outs["one"] / sub / name), load_file(outs["two"] / sub / name)
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_lq_over_gguf_formats_under_a_file_budget_exports_for_llama_cpp(tmp_path, capsys):
    """`qbara lq --configs gguf --file-budget` on a checkpoint folder (streamed), then `qbara export --format gguf`:
    a mixed-format base GGUF and the LoRA adapter GGUF beside it."""
    folder, out = _lq_over_gguf_formats(tmp_path)
    data = json.loads((out / "allocation.json").read_text())
    assert data["streamed"] and data["file_bits_per_param"] <= 7.0
    assert all(k.startswith("gguf:") for k in data["counts"]) and sum(data["counts"].values()) == 7
    assert "whole GGUF file" in capsys.readouterr().out
    gguf = tmp_path / "m.gguf"
    assert main(["export", "--model", str(out / "model"), "--adapter", str(out / "adapter"), "--format", "gguf",
                 "--out", str(gguf)]) == 0
    assert gguf.stat().st_size > 0 and (tmp_path / "m.adapter.gguf").stat().st_size > 0
    assert main(["lq", "--model", str(folder), "--method", "loftq", "--file-budget", "--out", str(tmp_path / "x")]) == 2
    assert "LoftQ has one format and no budget" in capsys.readouterr().err
    weighted = tmp_path / "lq-weighted"  # the same, every block rounded under the Fisher diagonal
    assert main(["lq", "--model", str(folder), "--rank", "2", "--budget", "7.0", "--configs", "gguf",
                 "--file-budget", "--table-iters", "2", "--max-iters", "2", "--factors", "fp32",
                 "--fisher-data", "shakespeare:hamlet", "--fisher-samples", "2", "--fisher-length", "32",
                 "--weighted-rounding", "--out", str(weighted)]) == 0
    data = json.loads((weighted / "allocation.json").read_text())
    assert data["settings"]["importance"] == "fisher" and data["file_bits_per_param"] <= 7.0


def test_lq_file_budget_counts_every_tensor_of_the_exported_file(tmp_path):
    """`qbara lq --file-budget` on a LLaMA-3 model (rope_freqs in its GGUF): the budget's parameters are exactly the
    elements of the base GGUF `qbara export` writes, and its fixed part exactly the bytes of the tensors outside the
    allocated matrices (read back by gguf-py)."""
    from pathlib import Path

    from gguf import GGUFReader

    fixture = json.loads((Path(__file__).parent.parent / "fixtures" / "llamacpp_presets.json").read_text())
    _, out = _lq_over_gguf_formats(tmp_path, fixture["tiny-llama3-256"]["config"]["rope_parameters"])
    budget = json.loads((out / "allocation.json").read_text())["settings"]["file_budget"]
    gguf = tmp_path / "m.gguf"
    assert main(["export", "--model", str(out / "model"), "--adapter", str(out / "adapter"), "--format", "gguf",
                 "--out", str(gguf)]) == 0
    tensors = GGUFReader(str(gguf)).tensors
    assert "rope_freqs.weight" in {t.name for t in tensors}
    assert budget["total_params"] == sum(int(t.n_elements) for t in tensors)
    fixed = [t for t in tensors if not (".attn_" in t.name or ".ffn_" in t.name) or len(t.shape) < 2]
    assert budget["fixed_bits"] == 8 * sum(int(t.n_bytes) for t in fixed)


def _lq_over_gguf_formats(tmp_path, rope_parameters=None):
    """(folder, out): a tiny dense LLaMA folder and `qbara lq --configs gguf --file-budget --budget 7` on it."""
    from qbara.models import tiny_llama

    model, tokenizer = tiny_llama(hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2)
    if rope_parameters is not None:  # LLaMA-3's rope scaling: its GGUF holds rope_freqs
        model.config.rope_parameters = dict(rope_parameters)
    folder, out = tmp_path / "dense", tmp_path / "lq"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["lq", "--model", str(folder), "--rank", "2", "--budget", "7.0", "--configs", "gguf",
                 "--file-budget", "--table-iters", "2", "--max-iters", "2", "--factors", "fp32",
                 "--out", str(out)]) == 0
    return folder, out
