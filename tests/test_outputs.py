"""qbara.outputs: outputs never destroy inputs or users' files; folder swaps are atomic at every step; locks."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from qbara import outputs
from qbara.errors import QbaraError
from qbara.outputs import REPLACED, check_output, output_folder, output_lock


def _write(folder, files: dict):
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _contents(folder) -> dict:
    """rel path -> text of every file but the manifest."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != outputs._MANIFEST}


def _produce(path, files: dict, **kw):
    with output_folder(path, **kw) as tmp:
        _write(tmp, files)


def test_refuses_the_working_folder_and_its_parents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    for out in (".", "..", str(tmp_path), "./"):
        with pytest.raises(QbaraError, match="working folder"):
            check_output(out, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "x"


def test_refuses_an_output_that_is_or_contains_an_input(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text("{}")
    for out in (adapter, tmp_path / "run", data):
        with pytest.raises(QbaraError, match="is or contains the input"):
            check_output(out, ["tiny-llama", str(adapter), str(data)], overwrite=True,
                         kind="file" if out == data else "folder")
    check_output(tmp_path / "elsewhere", ["tiny-llama", str(adapter)])  # names that are not paths are skipped


def test_foreign_folder_needs_overwrite_and_keeps_every_user_file(tmp_path):
    out = tmp_path / "out"
    _write(out, {"notes.txt": "mine", "sub/data.csv": "1,2", "config.json": "my config"})
    with pytest.raises(QbaraError, match="not empty and was not written by qbara.*--overwrite"):
        _produce(out, {"config.json": "qbara", "model.safetensors": "w"})
    assert _contents(out) == {"notes.txt": "mine", "sub/data.csv": "1,2", "config.json": "my config"}
    _produce(out, {"config.json": "qbara", "model.safetensors": "w"}, overwrite=True)
    assert _contents(out) == {"notes.txt": "mine", "sub/data.csv": "1,2", "config.json": "qbara",
                              "model.safetensors": "w", f"{REPLACED}/config.json": "my config"}


def test_qbara_folder_is_replaced_but_files_added_later_are_kept(tmp_path):
    out = tmp_path / "out"
    _produce(out, {"a.txt": "1", "nested/b.txt": "2"})
    (out / "user.txt").write_text("added by the user")
    _produce(out, {"a.txt": "new", "c.txt": "3"})  # no overwrite needed: qbara wrote it
    assert _contents(out) == {"a.txt": "new", "c.txt": "3", "user.txt": "added by the user"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no backups, temporaries or lock left


def test_a_failing_write_leaves_the_old_output_and_no_temporaries(tmp_path):
    out = tmp_path / "out"
    _produce(out, {"a.txt": "old"})
    with pytest.raises(RuntimeError):
        with output_folder(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert _contents(out) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Injected(Exception):
    pass


def _failing_fs(monkeypatch, fail_at: int) -> list:
    """Make the fail_at-th filesystem call of qbara.outputs raise (a kill between two calls)."""
    calls = []
    for name in ("rename", "rmtree", "link", "copy", "makedirs", "symlink"):
        real = getattr(outputs._FileSystem, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == fail_at:
                raise _Injected(f"killed before {_name} #{fail_at}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(outputs.fs, name, wrapped)
    return calls


@pytest.mark.parametrize("hard_kill", [False, True], ids=["exception", "kill"])
def test_killed_at_every_step_of_a_swap_the_path_holds_old_or_new(hard_kill, tmp_path, monkeypatch):
    if hard_kill:  # a SIGKILL runs no clean-up: the unfinished output stays for the next run to remove
        monkeypatch.setattr(outputs, "_discard", lambda tmp: None)
    old = {"a.txt": "old", "deep/x.txt": "old x"}
    new = {"a.txt": "new", "b.txt": "new b"}
    user = {"user.txt": "keep me"}
    step = 1
    while True:
        root = tmp_path / f"case{step}"
        out = root / "out"
        _produce(out, old)
        _write(out, user)
        with monkeypatch.context() as patch:
            calls = _failing_fs(patch, step)
            try:
                _produce(out, new)
                finished = True
            except _Injected:
                finished = False
        state = _contents(out) if out.exists() else None
        # What a killed run leaves on disk (the exception path's clean-up is skipped by a real kill, so
        # leftovers are possible): the path is old or new, whole, or missing with the backup beside it.
        if state is None:
            assert list(root.glob(".out.qbara-old-*")), f"step {step}: output gone and no backup"
        else:
            assert state in ({**old, **user}, {**new, **user}), f"step {step}: {state}"
        # The next run recovers: the path is old or new, and nothing is left beside it.
        with output_lock(out):
            pass
        assert _contents(out) in ({**old, **user}, {**new, **user}), f"step {step} after recovery"
        assert sorted(p.name for p in root.iterdir()) == ["out"], f"step {step}: leftovers"
        if finished:
            break
        step += 1
    assert step >= 4 and "rename" in calls  # link(s), backup rename, swap rename, backup removal were all hit


def test_killed_swap_of_a_real_quantized_model_always_loads(tmp_path, monkeypatch):
    import torch

    from qbara import QuantConfig, load_model
    from qbara.models.streaming import quantize_model
    from qbara.native import save_quantized

    model, tok = load_model("tiny-llama")
    quantize_model(model, QuantConfig("int4", 32))
    out = tmp_path / "q"
    save_quantized(model, tok, out)
    reference = load_model(str(out))[0]
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = reference(input_ids=ids).logits
    step = 1
    while True:
        with monkeypatch.context() as patch:
            _failing_fs(patch, step)
            try:
                save_quantized(model, tok, out)
                finished = True
            except _Injected:
                finished = False
        with output_lock(out):  # recovery, as the next command does
            pass
        loaded = load_model(str(out))[0]
        assert torch.equal(loaded(input_ids=ids).logits, expected), f"step {step}"
        if finished:
            break
        step += 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def _journal(folder, out_name: str, entries: list[tuple[str, str]]):
    """The lock file a killed run leaves: its pid, then the temporaries (kind, name) it had created."""
    lines = ["12345"] + [json.dumps({"kind": kind, "path": name, "target": out_name}) for kind, name in entries]
    (folder / f".{out_name}.qbara-lock").write_text("\n".join(lines) + "\n")


def test_recovery_restores_a_backup_whose_new_output_never_arrived(tmp_path, capsys):
    out = tmp_path / "out"
    backup = tmp_path / ".out.qbara-old-abc123"
    _write(backup, {"a.txt": "old"})
    _write(tmp_path / ".out.qbara-new-def456", {"a.txt": "half"})
    (tmp_path / ".out.xyz.tmp").write_text("half a file")
    _journal(tmp_path, "out", [("old", backup.name), ("new", ".out.qbara-new-def456"), ("tmp", ".out.xyz.tmp")])
    with output_lock(out):
        assert _contents(out) == {"a.txt": "old"}
    err = capsys.readouterr().err
    assert "restoring" in err and "removing .out.qbara-new-def456" in err and "removing .out.xyz.tmp" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_writer_fails_at_once_with_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(QbaraError, match=f"another qbara process \\(pid {os.getpid()}\\)"):
            with output_lock(out):
                pass
    with output_lock(out):  # released: free again
        pass


def test_lock_held_by_another_process_blocks_the_cli(tmp_path, capsys):
    from qbara.cli import main

    out = tmp_path / "merged"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from qbara.outputs import output_lock
        with output_lock(pathlib.Path({str(out)!r})):
            pathlib.Path({str(ready)!r}).write_text("1")
            time.sleep(60)
        """)])
    try:
        for _ in range(600):
            if ready.exists():
                break
            import time

            time.sleep(0.1)
        assert ready.exists()
        assert main(["merge", "--model", "tiny-llama", "--adapter", str(tmp_path / "none"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()


def test_file_outputs_refuse_foreign_files(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not mine")
    with pytest.raises(QbaraError, match="exists and was not written by qbara"):
        check_output(path, kind="file")
    check_output(path, kind="file", overwrite=True)
    with pytest.raises(QbaraError, match="is a folder"):
        check_output(tmp_path, kind="file", overwrite=True)
