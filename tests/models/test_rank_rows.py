"""The load pipeline's `rank_rows`: each tensor a rank keeps is exactly its dim-0 chunk of what the whole load
keeps (torch.chunk's rows, as FSDP2 shards them), and the dense fingerprint is the whole load's (tied too)."""
import pytest
import torch

from qbara import QuantConfig, load_model, model_fingerprint
from qbara.models import tiny_llama
from qbara.models.streaming import rank_rows, rows_held
from qbara.nn import QuantizedLinear


def _folder(tmp_path, dtype, tied):
    model, tokenizer = tiny_llama(seed=0, vocab=263, tie_word_embeddings=tied)  # 263 rows: uneven chunks
    folder = tmp_path / f"{dtype}-{tied}"
    model.to(dtype).save_pretrained(folder, max_shard_size="20KB")
    tokenizer.save_pretrained(folder)
    return folder, model_fingerprint(model.to(dtype))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_keeps_its_chunk_of_the_whole_load(tmp_path, tied, dtype, world):
    folder, fingerprint = _folder(tmp_path, dtype, tied)
    quant = QuantConfig("nf4", 32, double_quant=True)
    whole, _ = load_model(str(folder), quant=quant)
    assert whole.qbara.base_fingerprint == fingerprint
    expected = dict(whole.named_parameters()) | {f"{n}.{b}": getattr(m, b) for n, m in whole.named_modules()
                                                if isinstance(m, QuantizedLinear) for b in m._buffer_names}
    for rank in range(world):
        with rank_rows(rank, world):
            part, _ = load_model(str(folder), quant=quant)
        assert part.qbara.base_fingerprint == fingerprint
        if tied:
            assert part.lm_head.weight is part.model.embed_tokens.weight
        seen = set()
        for name, module in part.named_modules():
            for leaf, (shape, share) in rows_held(module).items():
                key = f"{name}.{leaf}"
                full = expected[key]
                assert share == (rank, world) and shape == full.shape
                chunks = torch.chunk(full, world)
                mine = chunks[rank] if rank < len(chunks) else full[:0]
                assert torch.equal(getattr(module, leaf), mine), key
                seen.add(key)
        # every parameter and packed buffer but the 0-d ones (none here) is held as rows
        assert seen == {k for k in expected if not (tied and k == "lm_head.weight")}
