import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qbara import load_adapter
from qbara.atomic import write_json_atomic
from qbara.eval.loss import masked_loss
from qbara.models import tiny_llama
from qbara.train.config import build_config
from qbara.train.data import build_examples, read_records
from qbara.train.trainer import COMPLETE_MARKER, latest_complete_checkpoint, start_checkpoint, train
from tests.helpers import free_port

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _records(path: Path, n: int = 48):
    rng = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, 50, (n, 2), generator=rng).tolist()
    path.write_text("\n".join(json.dumps({"instruction": f"Add {a} and {b}.", "output": str(a + b)})
                              for a, b in pairs))
    return path


def _config(tmp_path, out="out", **train):
    data = _records(tmp_path / "train.jsonl")
    return {
        "model": "tiny-llama",
        "quant": {"format": "int4", "block_size": 32},
        "adapter": {"method": "qahira", "rank": 4, "alpha": 8},
        "data": {"train": str(data), "max_length": 256},
        "train": {"output_dir": str(tmp_path / out), "steps": 6, "batch_size": 4, "lr": 3e-3, "save_steps": 3,
                  "logging_steps": 1, "progress": False, **train},
    }


def test_train_save_load_eval_end_to_end(tmp_path):
    config = build_config(_config(tmp_path))
    result = train(config)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (result.output_dir / "loss_curve.png").stat().st_size > 1000
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # Load the adapter onto a fresh base: the eval loss equals the trained model's and beats the base.
    examples = build_examples(read_records(config.data.train), tiny_llama()[1], "instruction", 256)[:8]
    base, _ = tiny_llama()
    base_loss = masked_loss(base, examples)["loss"]
    fresh, _ = tiny_llama()
    load_adapter(fresh, result.adapter_dir)
    assert masked_loss(fresh, examples)["loss"] < base_loss


def test_refuses_to_overwrite_checkpoints_without_resume(tmp_path):
    config = build_config(_config(tmp_path, steps=3))
    train(config)
    from qbara.errors import QbaraError

    with pytest.raises(QbaraError, match="pass --resume"):
        train(config)


def test_incomplete_checkpoint_is_never_picked_up(tmp_path):
    config = build_config(_config(tmp_path, steps=3))
    train(config)
    out = Path(config.train.output_dir)
    assert latest_complete_checkpoint(out).name == "checkpoint-3"
    half = out / "checkpoint-9"
    start_checkpoint(half)  # a save killed half-way: qbara's saving marker, a partial file, no completion marker
    (half / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_complete_checkpoint(out).name == "checkpoint-3"
    resumed = build_config(_config(tmp_path, steps=6))
    train(resumed, resume=True)
    assert not half.exists()
    assert latest_complete_checkpoint(out).name == "checkpoint-6"


def test_atomic_json_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"step": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"step": object()})
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "qbara", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_sigkill_gives_the_same_adapter(tmp_path):
    import yaml

    steps = 12
    straight = tmp_path / "straight.yaml"
    straight.write_text(yaml.safe_dump(_config(tmp_path, out="a", steps=steps, save_steps=2)))
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(_config(tmp_path, out="b", steps=steps, save_steps=2)))
    assert _run_cli(["train", "--config", str(straight)]).wait(timeout=600) == 0

    proc = _run_cli(["train", "--config", str(killed)])
    marker = tmp_path / "b" / "checkpoint-4" / COMPLETE_MARKER
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "adapter").exists(), "the run finished before it could be killed"
    resumed = _run_cli(["train", "--config", str(killed), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resuming from" in output
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ddp_two_ranks_match_one_process(tmp_path):
    import yaml

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(600)))

    def config(out, batch):
        c = _config(tmp_path, out=out, steps=4, batch_size=batch, save_steps=100)
        c["data"] = {"train": str(text), "format": "text", "max_length": 64}
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(c))
        return path

    single = _run_cli(["train", "--config", str(config("single", 4))])
    assert single.wait(timeout=600) == 0, single.stdout.read()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "qbara", "train", "--config", str(config("ddp", 2))],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    curves = {}
    for run in ("single", "ddp"):
        history = json.loads((tmp_path / run / "log_history.json").read_text())
        curves[run] = [h["loss"] for h in history if "loss" in h]
    assert len(curves["single"]) == 4
    assert curves["ddp"] == pytest.approx(curves["single"], rel=1e-4)


def test_report_to_tensorboard_writes_event_files_offline(tmp_path):
    pytest.importorskip("tensorboard")
    from qbara.train.config import build_config
    from qbara.train.trainer import train

    records = tmp_path / "t.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": "Say hi.", "output": "hi"}) for _ in range(8)))
    config = build_config({"model": "tiny-llama", "quant": {"format": "int4"}, "adapter": {"method": "qahira", "rank": 4},
                           "data": {"train": str(records), "max_length": 256},
                           "train": {"output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "save_steps": 2,
                                     "logging_steps": 1, "progress": False, "report_to": "tensorboard"}})
    train(config)
    events = list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize("value,message", [("tensorbord", "write none, or one or more of tensorboard"),
                                           ("none,wandb", "write none, or one or more of")])
def test_report_to_is_checked(value, message):
    from qbara.errors import QbaraError
    from qbara.train.config import build_config

    with pytest.raises(QbaraError, match=message):
        build_config({"train": {"report_to": value}})
