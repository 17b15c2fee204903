"""An interrupted LQ error table resumes from the rows it saved: only the missing matrices are computed again, and
the table equals one computed without interruption; damaged rows are recomputed, foreign files left alone."""
import os
import stat
import threading
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qbara.lq.tables as tables_mod
from qbara.atomic import current_umask
from qbara.lq.configs import qlora_config
from qbara.lq.tables import error_table
from qbara.quant import QuantConfig
from qbara.tensor_checks import tensors_digest

SHAPES = [(32, 64), (64, 64), (32, 128), (48, 64), (32, 64)]
WEIGHTS = {f"w{i}": torch.randn(s, generator=torch.Generator().manual_seed(i)) * 0.02 for i, s in enumerate(SHAPES)}
CONFIGS = [qlora_config(b) for b in (2, 4)] + [QuantConfig("nf3", 32)]
KW = dict(rank=2, progress=False)  # the default, exact dq_mode="refine"
N = len(WEIGHTS)


class Interrupted(Exception):
    pass


def counting(monkeypatch, fail_at: int | None = None) -> list[str]:
    """Count `matrix_costs` calls (the matrix names); with `fail_at`, the call of that number raises instead."""
    real, calls, lock = tables_mod.matrix_costs, [], threading.Lock()

    def wrapper(W, configs, **kwargs):
        with lock:
            calls.append(kwargs["name"])
            number = len(calls)
        if fail_at is not None and number >= fail_at:
            raise Interrupted(f"killed at matrix {number}")
        return real(W, configs, **kwargs)

    monkeypatch.setattr(tables_mod, "matrix_costs", wrapper)
    return calls


@pytest.fixture(scope="module")
def reference():
    return error_table(WEIGHTS, CONFIGS, cache=False, **KW)


def partial_folder(cache):
    folders = list(cache.glob("table-*.partial"))
    assert len(folders) == 1
    return folders[0]


def rows_in(folder):
    return sorted(p.name for p in folder.glob("row-*.safetensors"))


def interrupt(monkeypatch, cache, k, **kwargs):
    """Run the table until `k` matrices are done (the next one fails); returns the partial folder."""
    with monkeypatch.context() as m:
        counting(m, fail_at=k + 1)
        with pytest.raises(Interrupted):
            error_table(WEIGHTS, CONFIGS, cache_dir=cache, **{**KW, **kwargs})
    assert not list(cache.glob("table-*.safetensors"))  # no table entry yet
    return partial_folder(cache)


def row_index(name: str) -> int:
    return int(name[len("row-"):-len(".safetensors")])


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_table_computes_only_the_missing_matrices(workers, reference, tmp_path, monkeypatch, capsys):
    folder = interrupt(monkeypatch, tmp_path, 2, workers=workers)
    saved = rows_in(folder)
    if workers == 1:
        assert len(saved) == 2
    else:  # the other thread's matrix may have finished too
        assert 1 <= len(saved) <= 3
    done = {f"w{row_index(name)}" for name in saved}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~current_umask()  # a new folder's, not mkdtemp's 0700
    calls = counting(monkeypatch)
    table = error_table(WEIGHTS, CONFIGS, cache_dir=tmp_path, workers=workers, rank=2, progress=True)
    assert sorted(calls) == sorted(set(WEIGHTS) - done)  # each missing matrix once, none of the saved
    assert torch.equal(table.costs, reference.costs) and not table.from_cache
    assert f"{len(done)} of {N} resumed" in capsys.readouterr().err
    assert not folder.exists()  # removed once the table was saved
    again = error_table(WEIGHTS, CONFIGS, cache_dir=tmp_path, **KW)
    assert again.from_cache and torch.equal(again.costs, reference.costs) and len(calls) == N - len(done)


def test_rows_are_only_reused_for_the_same_settings(reference, tmp_path, monkeypatch):
    interrupt(monkeypatch, tmp_path, 3)
    calls = counting(monkeypatch)
    other = error_table(WEIGHTS, CONFIGS, cache_dir=tmp_path, rank=2, seed=1, progress=False)
    assert len(calls) == N and not torch.equal(other.costs, reference.costs)
    assert len(list(tmp_path.glob("table-*.partial"))) == 1  # the first table's rows are still there


def test_damaged_and_mismatched_rows_are_recomputed_with_one_warning(reference, tmp_path, monkeypatch):
    folder = interrupt(monkeypatch, tmp_path, 4)
    rows = [folder / name for name in rows_in(folder)]
    assert [row_index(p.name) for p in rows] == [0, 1, 2, 3]
    data = rows[0].read_bytes()
    rows[0].write_bytes(data[: len(data) // 2])  # truncated
    with safe_open(str(rows[1]), framework="pt") as fh:
        meta, costs = fh.metadata(), fh.get_tensor("costs")
    longer = torch.cat([costs, costs[:1]])  # another shape, every other field right (its SHA-256 included)
    save_file({"costs": longer}, str(rows[1]), metadata={**meta, "sha256": tensors_digest({"costs": longer})})
    changed = bytearray(rows[2].read_bytes())
    changed[-1] ^= 0x01  # one bit of a cost flipped
    rows[2].write_bytes(bytes(changed))
    calls = counting(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = error_table(WEIGHTS, CONFIGS, cache_dir=tmp_path, **KW)
    damaged = [w for w in caught if "damaged" in str(w.message)]
    assert len(damaged) == 1 and "3 saved row(s)" in str(damaged[0].message)
    assert sorted(calls) == ["w0", "w1", "w2", "w4"]  # w3's row was intact
    assert torch.equal(table.costs, reference.costs)


def test_a_row_of_another_matrix_is_not_used(reference, tmp_path, monkeypatch):
    folder = interrupt(monkeypatch, tmp_path, 2)
    kept, copied = rows_in(folder)
    (folder / copied).write_bytes((folder / kept).read_bytes())  # the same shape, another matrix's costs
    calls = counting(monkeypatch)
    with pytest.warns(UserWarning, match="1 saved row.*name, index differ"):
        table = error_table(WEIGHTS, CONFIGS, cache_dir=tmp_path, **KW)
    assert sorted(calls) == sorted(set(WEIGHTS) - {f"w{row_index(kept)}"})
    assert torch.equal(table.costs, reference.costs)


def test_recompute_drops_the_saved_rows(reference, tmp_path, monkeypatch):
    folder = interrupt(monkeypatch, tmp_path, 3)
    interrupt(monkeypatch, tmp_path, 0, recompute=True)  # recompute, killed before its first matrix finished
    assert rows_in(folder) == []
    interrupt(monkeypatch, tmp_path, 2)
    calls = counting(monkeypatch)
    table = error_table(WEIGHTS, CONFIGS, cache_dir=tmp_path, recompute=True, **KW)
    assert len(calls) == N and torch.equal(table.costs, reference.costs) and not folder.exists()


def test_foreign_files_in_the_partial_folder_are_kept(reference, tmp_path, monkeypatch):
    folder = interrupt(monkeypatch, tmp_path, 2)
    (folder / "notes.txt").write_text("mine")
    (folder / "row-00009.safetensors").write_text("not a row of this table")  # no matrix 9 here
    with pytest.warns(UserWarning, match="kept .* holds files that are not rows of this table"):
        table = error_table(WEIGHTS, CONFIGS, cache_dir=tmp_path, **KW)
    assert torch.equal(table.costs, reference.costs)
    assert sorted(os.listdir(folder)) == [".qbara-table-rows.json", "notes.txt", "row-00009.safetensors"]
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("planted", ["symlink", "folder"])
def test_a_planted_partial_folder_is_neither_followed_nor_touched(planted, reference, tmp_path, monkeypatch):
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    folder = interrupt(monkeypatch, cache, 2)
    os.rename(folder, elsewhere)  # real rows of this very table, marker included
    if planted == "symlink":
        folder.symlink_to(elsewhere, target_is_directory=True)
    else:
        folder.mkdir()
        row = rows_in(elsewhere)[0]  # a real row, without the marker
        (folder / row).write_bytes((elsewhere / row).read_bytes())
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}
    calls = counting(monkeypatch)
    with pytest.warns(UserWarning, match="not written by qbara"):
        table = error_table(WEIGHTS, CONFIGS, cache_dir=cache, **KW)
    assert len(calls) == N and torch.equal(table.costs, reference.costs)  # nothing resumed through it
    assert folder.is_symlink() == (planted == "symlink")
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before  # nothing written nor removed
    assert len(os.listdir(elsewhere)) == 3  # the marker and two rows


def test_without_the_cache_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "env"))
    with monkeypatch.context() as m:
        counting(m, fail_at=3)
        with pytest.raises(Interrupted):
            error_table(WEIGHTS, CONFIGS, cache=False, cache_dir=tmp_path, **KW)
    error_table(WEIGHTS, CONFIGS, cache=False, **KW)
    assert os.listdir(tmp_path) == []
