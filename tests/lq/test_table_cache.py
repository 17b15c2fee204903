"""A damaged cached LQ error table is rebuilt with a warning, never a traceback or a wrong table."""
import pytest
import torch

from qbara.errors import QbaraError
from qbara.lq.configs import qlora_config
from qbara.lq.tables import ErrorTable, error_table

WEIGHTS = {f"w{i}": torch.randn(32, 64, generator=torch.Generator().manual_seed(i)) * 0.02 for i in range(3)}
CONFIGS = [qlora_config(b) for b in (2, 4)]


@pytest.mark.parametrize("damage", ["random-costs", "empty-costs", "json-not-a-table", "json-deep", "json-bytes"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(damage, tmp_path):
    first = error_table(WEIGHTS, CONFIGS, rank=2, iters=1, cache_dir=tmp_path, progress=False)
    costs, meta = first.path, first.path.with_suffix(".json")
    if damage == "random-costs":
        costs.write_bytes(bytes(range(256)) * 4)
    elif damage == "empty-costs":
        costs.write_bytes(b"")
    elif damage == "json-not-a-table":
        meta.write_text('{"format": "qbara-lq-error-table", "names": 3}')
    elif damage == "json-deep":
        meta.write_text("[" * 10000 + "]" * 10000)
    else:
        meta.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(QbaraError, match="delete it to recompute"):
        ErrorTable.load(costs)
    with pytest.warns(UserWarning, match="rebuilding it"):
        again = error_table(WEIGHTS, CONFIGS, rank=2, iters=1, cache_dir=tmp_path, progress=False)
    assert not again.from_cache and torch.equal(again.costs, first.costs)
    assert torch.equal(ErrorTable.load(costs).costs, first.costs)  # the entry was written again


def test_each_dq_mode_has_its_own_cache_entry(tmp_path):
    """A table cached for one dq_mode is never returned for another (the mode is part of the key)."""
    shared = error_table(WEIGHTS, CONFIGS, rank=2, dq_mode="shared", cache_dir=tmp_path, progress=False)
    warm = error_table(WEIGHTS, CONFIGS, rank=2, dq_mode="warm", cache_dir=tmp_path, progress=False)
    assert not warm.from_cache and warm.path != shared.path
    assert warm.settings["dq_mode"] == "warm" and shared.settings["dq_mode"] == "shared"
    again = error_table(WEIGHTS, CONFIGS, rank=2, dq_mode="warm", cache_dir=tmp_path, progress=False)
    assert again.from_cache and torch.equal(again.costs, warm.costs)
