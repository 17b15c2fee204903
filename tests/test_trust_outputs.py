"""Issue #26, outputs: the lock never writes through a planted file, recovery touches only what qbara journaled,
and write faults inside safetensors' writer are one line."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from qbara import outputs
from qbara.cli import main
from qbara.errors import QbaraError
from qbara.outputs import output_folder, output_lock
from tests.test_hardening import ENV, _check_one_line, good  # noqa: F401  (good: the shared fixture)


def _produce(out, files: dict):
    with output_folder(out) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _texts(folder) -> dict:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file() and p.name != outputs._MANIFEST}


# ---------------------------------------------------------------- 1. a planted lock file is never written through


def test_a_lock_planted_as_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.qbara-lock").symlink_to("victim.txt")
    with pytest.raises(QbaraError, match=r"\.out\.qbara-lock is a symbolic link; .*remove .*\.out\.qbara-lock"):
        _produce(tmp_path / "out", {"a.txt": "new"})
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.qbara-lock").is_symlink()  # not ours: left for the user to remove


def test_merge_with_a_planted_symlink_lock_is_one_line_and_the_target_kept(good, tmp_path, capsys):  # noqa: F811
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.qbara-lock").symlink_to(victim)
    rc = main(["merge", "--model", "tiny-llama", "--adapter", str(good / "adapter"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    _check_one_line(rc, err)
    assert "symbolic link" in err and str(tmp_path / ".out.qbara-lock") in err
    assert victim.read_text() == "precious"


def _hard_link(lock, victim):
    os.link(victim, lock)


def _fifo(lock, victim):
    os.mkfifo(lock)


def _foreign_owner(lock, victim):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the lock file another owner")
    lock.write_text("")
    os.chown(lock, 4321, 4321)


@pytest.mark.parametrize("plant, message", [(_hard_link, "hard links"), (_fifo, "not a regular file"),
                                            (_foreign_owner, "belongs to another user")])
def test_a_lock_that_is_not_this_users_own_file_is_refused(plant, message, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = tmp_path / ".out.qbara-lock"
    plant(lock, victim)
    with pytest.raises(QbaraError, match=f"lock file {lock} .*{message}.*remove {lock}"):
        with output_lock(tmp_path / "out"):
            pass
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------- 2. look-alike files are the user's


def test_look_alikes_of_temporaries_are_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    _produce(out, {"a.txt": "old"})
    mine = {".out.qbara-old-12345": "my old", ".out.qbara-new-777": "my new"}
    for name, text in mine.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text(text)
    (tmp_path / ".out.backup.tmp").write_text("my backup")
    _produce(out, {"a.txt": "new"})
    with output_lock(out):
        pass
    assert _texts(out) == {"a.txt": "new"}
    for name, text in mine.items():
        assert (tmp_path / name / "notes.txt").read_text() == text
    assert (tmp_path / ".out.backup.tmp").read_text() == "my backup"
    assert "removing" not in capsys.readouterr().err


def test_a_journal_naming_anything_but_a_temporary_of_this_output_is_ignored(tmp_path):
    """A forged or damaged journal cannot make recovery delete other files."""
    import json

    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "f.txt").write_text("mine")
    (tmp_path / ".other.qbara-new-1").mkdir()
    entries = [{"kind": "new", "path": "keep", "target": "out"},
               {"kind": "new", "path": ".other.qbara-new-1", "target": "other"},
               {"kind": "new", "path": "../x.qbara-new-1", "target": "out"}, "not an entry", {"kind": "new"}]
    (tmp_path / ".out.qbara-lock").write_text("1\n" + "\n".join(json.dumps(e) for e in entries) + "\n{\n")
    with output_lock(tmp_path / "out"):
        pass
    assert (tmp_path / "keep" / "f.txt").read_text() == "mine" and (tmp_path / ".other.qbara-new-1").is_dir()


_KILLED_SWAP = """
import os, pathlib, signal
from qbara import outputs
from qbara.atomic import write_file_atomic

out = pathlib.Path({out!r})
renames = []


def rename(src, dst):
    renames.append(dst)
    if len(renames) == 2:  # the previous output is moved aside, the new one not yet in: SIGKILL
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(src, dst)


def half(tmp):  # a file output killed mid-write
    pathlib.Path(tmp).write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)


if {kill_file}:
    with outputs.output_file(pathlib.Path({gguf!r})):
        write_file_atomic(pathlib.Path({gguf!r}), half)
outputs.fs.rename = rename
with outputs.output_folder(out) as tmp:
    (tmp / "a.txt").write_text("new")
"""


def test_a_killed_runs_real_leftovers_are_recovered_and_look_alikes_kept(tmp_path, capsys):
    out, gguf = tmp_path / "out", tmp_path / "m.gguf"
    _produce(out, {"a.txt": "old"})
    (tmp_path / ".out.qbara-new-777").mkdir()
    (tmp_path / ".m.gguf.mine.tmp").write_text("my file")
    for kill_file in (True, False):
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_SWAP.format(
            out=str(out), gguf=str(gguf), kill_file=kill_file))], env=ENV, capture_output=True, text=True)
        assert run.returncode == -signal.SIGKILL, run.stderr
    assert not out.exists() and len(list(tmp_path.glob(".out.qbara-old-*"))) == 1  # what the kill left
    assert len(list(tmp_path.glob(".m.gguf.*.tmp"))) == 2
    with output_lock(out), output_lock(gguf):
        pass
    err = capsys.readouterr().err
    assert _texts(out) == {"a.txt": "old"} and "restoring" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.gguf.mine.tmp", ".out.qbara-new-777", "out"], err
    assert (tmp_path / ".m.gguf.mine.tmp").read_text() == "my file"


# ---------------------------------------------------------------- 6. write faults in safetensors' writer


def test_merge_past_the_file_size_limit_is_one_line_and_keeps_the_previous_output(good, tmp_path):  # noqa: F811
    import resource

    out = tmp_path / "merged"
    argv = [sys.executable, "-m", "qbara", "merge", "--model", "tiny-llama", "--adapter", str(good / "adapter"),
            "--out", str(out)]
    assert subprocess.run(argv, env=ENV, capture_output=True, timeout=300, cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # noqa: E731
    run = subprocess.run(argv, env={**ENV, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, preexec_fn=limit)  # no progress lines: only the error
    _check_one_line(run.returncode, run.stderr)
    assert f"cannot write {out} (File too large)" in run.stderr and "previous output" in run.stderr, run.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("err, cause", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "torch's writer"),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed (inline_container.cc)"),
     "torch's writer"),
])
def test_torch_short_writes_are_write_errors(err, cause, tmp_path):
    mapped = outputs._write_failure(err, tmp_path / "out")
    assert isinstance(mapped, QbaraError) and cause in str(mapped) and "previous output" in str(mapped)


def test_other_errors_are_not_write_errors(tmp_path):
    from safetensors import SafetensorError

    for err in (RuntimeError("shape mismatch"), SafetensorError("header too large"), ValueError("x"),
                OSError(2, "No such file or directory")):
        assert outputs._write_failure(err, tmp_path) is None
