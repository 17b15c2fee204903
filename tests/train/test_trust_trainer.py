"""Issue #26, training: the final adapter is swapped in whole, a resume at the last step trains no more, a resume
with another quant is refused, write faults and a non-finite loss are one clear error before anything final."""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qbara.errors import QbaraError
from qbara.train.config import build_config
from qbara.train.trainer import COMPLETE_MARKER, train
from tests.test_hardening import _check_one_line
from tests.train.test_trainer import ENV, _config

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "qbara_adapter.json")


def _adapter(out: Path, folder: str = "adapter") -> dict:
    """The adapter's JSON files as bytes, its tensors as bytes (safetensors' header orders the metadata
    differently in each process, so the file's bytes are not compared)."""
    from safetensors.torch import load_file

    files = {name: (out / folder / name).read_bytes() for name in ADAPTER_FILES if name.endswith(".json")}
    tensors = load_file(str(out / folder / "adapter_model.safetensors"))
    return {"files": files,
            "tensors": {key: (str(t.dtype), tuple(t.shape), t.numpy().tobytes()) for key, t in tensors.items()}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run (checkpoint-2, adapter/) and its config, copied by each test."""
    tmp = tmp_path_factory.mktemp("finished")
    config = _config(tmp, steps=2, save_steps=2)
    train(build_config(config))
    return Path(config["train"]["output_dir"]), config


def _copy(finished, tmp_path, **train_settings) -> tuple[Path, dict]:
    out = shutil.copytree(finished[0], tmp_path / "out")
    config = json.loads(json.dumps(finished[1]))
    config["train"].update(output_dir=str(out), **train_settings)
    return out, config


def _yaml(tmp_path, config, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- 3 and 4: killed at the final save

_KILLED_AT_FINAL_SAVE = """
import os, pathlib, signal, sys
import qbara.train.trainer as trainer

real = trainer.save_adapter


def save_adapter(model, directory, **kw):
    folder = pathlib.Path(directory)
    if not folder.name.startswith("checkpoint-"):  # the final adapter: one file written, then SIGKILL
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text("{")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, directory, **kw)


trainer.save_adapter = save_adapter
from qbara.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_at_final_save(config_path: Path, *extra) -> None:
    run = subprocess.run([sys.executable, "-c", _KILLED_AT_FINAL_SAVE, "train", "--config", str(config_path),
                          *extra], env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr


def test_a_kill_during_the_final_save_keeps_the_previous_adapter_whole(finished, tmp_path):
    out, config = _copy(finished, tmp_path, steps=4)
    before = _adapter(out)
    _killed_at_final_save(_yaml(tmp_path, config), "--resume")
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file()  # the run got to its final save
    assert _adapter(out) == before
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(ADAPTER_FILES)
    (out / "adapter" / "notes.txt").write_text("mine")  # the user's file in adapter/ survives the swap
    train(build_config(config), resume=True)  # checkpoint-4 is the last step: the final outputs from it
    after, final_checkpoint = _adapter(out), _adapter(out, "checkpoint-4")
    assert after != before
    assert after["tensors"] == final_checkpoint["tensors"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted((*ADAPTER_FILES, "notes.txt"))
    assert (out / "adapter" / "notes.txt").read_text() == "mine"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".adapter.")]


def test_resume_after_a_kill_at_the_final_save_trains_no_extra_step(tmp_path):
    steps = 3
    straight = _yaml(tmp_path, _config(tmp_path, out="a", steps=steps, save_steps=steps), "straight.yaml")
    assert subprocess.run([sys.executable, "-m", "qbara", "train", "--config", str(straight)], env=ENV,
                          capture_output=True, timeout=600).returncode == 0
    killed = _config(tmp_path, out="b", steps=steps, save_steps=steps)
    _killed_at_final_save(_yaml(tmp_path, killed, "killed.yaml"))
    result = train(build_config(killed), resume=True)
    out = tmp_path / "b"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{steps}"]  # no checkpoint-4
    assert _adapter(out) == _adapter(tmp_path / "a")  # bit for bit the uninterrupted run's
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == steps
    assert result.final_loss is not None
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the killed save's temporary gone
    assert not [p.name for p in out.iterdir() if p.name.startswith(".adapter.")]


def test_resume_from_a_checkpoint_past_the_runs_steps_is_refused(finished, tmp_path):
    out, config = _copy(finished, tmp_path, steps=1)
    before = _adapter(out)
    with pytest.raises(QbaraError, match=r"checkpoint-2 is at step 2, past this run's 1 steps.*train.steps >= 2"):
        train(build_config(config), resume=True)
    assert _adapter(out) == before


# ---------------------------------------------------------------- 5: another quant on resume


def test_resume_with_another_quant_is_refused(finished, tmp_path):
    out, config = _copy(finished, tmp_path, steps=4)
    config["quant"] = {"format": "nf4", "block_size": 32}  # the adapter's shapes fit: it would carry on silently
    with pytest.raises(QbaraError, match=r"checkpoint-2 was trained on a base quantized as int4-g32 .* this run "
                                         r"quantizes it as nf4-b32.*original quant settings"):
        train(build_config(config), resume=True)
    assert not (out / "checkpoint-4").exists()


# ---------------------------------------------------------------- 6: write faults while training


@pytest.mark.parametrize("limit", [20_000, 8_000], ids=["torch.save", "safetensors"])
def test_train_past_the_file_size_limit_is_one_line_and_keeps_the_previous_output(limit, finished, tmp_path):
    """optimizer.pt (~30 kB, torch.save) or adapter_model.safetensors (~11 kB) of checkpoint-4 hits the limit."""
    import resource

    out, config = _copy(finished, tmp_path, steps=4)
    before = _adapter(out)
    set_limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # noqa: E731
    run = subprocess.run([sys.executable, "-m", "qbara", "train", "--config", str(_yaml(tmp_path, config)),
                          "--resume"], env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=set_limit)
    err = "\n".join(line for line in run.stderr.splitlines() if "kernels-community" not in line)
    _check_one_line(run.returncode, err)
    assert f"cannot write {out}" in err and "previous output" in err, err
    assert _adapter(out) == before and (out / "checkpoint-2" / COMPLETE_MARKER).is_file()


# ---------------------------------------------------------------- 7: a non-finite loss or adapter


def _nan_model():
    from qbara.models import tiny_llama

    model, tokenizer = tiny_llama()
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = float("nan")  # as rms_norm_eps: NaN in config.json
    return model, tokenizer


def test_a_nan_loss_stops_the_run_before_any_adapter_is_written(tmp_path):
    config = build_config(_config(tmp_path, steps=2, save_steps=1))
    model, tokenizer = _nan_model()
    with pytest.raises(QbaraError, match=r"training loss is nan at step 1; .*rms_norm_eps.*no final adapter"):
        train(config, model=model, tokenizer=tokenizer)
    out = Path(config.train.output_dir)
    assert not (out / "adapter").exists() and not list(out.glob("checkpoint-*"))


def test_a_nan_loss_on_resume_keeps_the_previous_output(finished, tmp_path):
    out, config = _copy(finished, tmp_path, steps=4)
    before = _adapter(out)
    model, tokenizer = _nan_model()
    with pytest.raises(QbaraError, match=r"training loss is nan at step 3"):
        train(build_config(config), resume=True, model=model, tokenizer=tokenizer)
    assert _adapter(out) == before and not (out / "checkpoint-4").exists()


def test_a_non_finite_adapter_is_never_saved_as_the_final_one(tmp_path, monkeypatch):
    import qbara.train.trainer as trainer_module
    from qbara.adapters.attach import adapter_layers

    make = trainer_module._trainer_class

    def poisoning():
        class Poisoned(make()):
            def training_step(self, model, *args, **kwargs):  # the loss stays finite; the weights do not
                loss = super().training_step(model, *args, **kwargs)
                layer = next(iter(adapter_layers(self.model).values()))
                with torch.no_grad():
                    next(iter(layer.adapter_parameters().values())).fill_(float("inf"))
                return loss
        return Poisoned

    monkeypatch.setattr(trainer_module, "_trainer_class", poisoning)
    config = build_config(_config(tmp_path, steps=1, save_steps=1))
    with pytest.raises(QbaraError, match=r"the trained adapter's .* holds non-finite values"):
        train(config)
    assert not (Path(config.train.output_dir) / "adapter").exists()


# ---------------------------------------------------------------- checkpoint folders qbara did not start


def test_a_users_checkpoint_like_folder_is_never_removed_on_resume(finished, tmp_path):
    """A `checkpoint-N` folder without qbara's saving marker is the user's: --resume leaves it and its files,
    and the run refuses to save a checkpoint into it rather than mixing files."""
    out, config = _copy(finished, tmp_path, steps=3, save_steps=1)
    mine = out / "checkpoint-3"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(QbaraError, match="checkpoint-3 exists and was not written by qbara"):
        train(build_config(config), resume=True)
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_killed_save_is_removed_on_resume(finished, tmp_path):
    """A folder qbara started (saving marker) and never completed is removed on --resume and saved anew."""
    from qbara.train.trainer import start_checkpoint

    out, config = _copy(finished, tmp_path, steps=3, save_steps=1)
    start_checkpoint(out / "checkpoint-3")
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    train(build_config(config), resume=True)
    assert (out / "checkpoint-3" / COMPLETE_MARKER).is_file()
