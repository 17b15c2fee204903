import pytest
import torch

from qbara.quant import QuantConfig, dequantize_nf, nf_levels, quantize, quantize_nf

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _bnb_codes(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)


def test_nf4_levels_equal_bitsandbytes_table():
    ours = nf_levels(4)
    theirs = bnb_functional.get_4bit_type("nf4", device="cpu")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("seed,scale,shape", [(0, 1.0, (256, 512)), (1, 0.02, (64, 4096)), (2, 30.0, (333, 128))])
def test_nf4_codes_and_absmax_equal_bitsandbytes(seed, scale, shape):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * scale
    w[0, :64] = 0.0  # an all-zero block
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes, absmax = quantize_nf(w, 4, 64)
    assert torch.equal(codes, _bnb_codes(packed)[: w.numel()])
    assert torch.equal(absmax, state.absmax)


def test_nf4_packed_bytes_equal_bitsandbytes_and_dequant_matches():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    qt = quantize(w, QuantConfig("nf4", block_size=64, double_quant=False))
    assert torch.equal(qt.tensors["codes"], packed.reshape(-1))
    theirs = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(qt.dequantize(), theirs)


def test_nf2_nf3_level_values():
    assert torch.allclose(nf_levels(2), torch.tensor([-1.0, 0.0, 0.3379, 1.0]), atol=1e-4)
    nf3 = torch.tensor([-1.0, -0.4786, -0.2171, 0.0, 0.1609, 0.3379, 0.5626, 1.0])
    assert torch.allclose(nf_levels(3), nf3, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_levels_shape_and_asymmetry(bits):
    levels = nf_levels(bits)
    assert levels.numel() == 2**bits
    assert torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1.0 and levels[-1] == 1.0
    assert (levels < 0).sum() == 2 ** (bits - 1) - 1 and (levels == 0).sum() == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_rounds_to_nearest_level(bits):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    codes, absmax = quantize_nf(w, bits, 64)
    normalized = (w.reshape(-1, 64) / absmax[:, None]).reshape(-1)
    levels = nf_levels(bits)
    brute = (normalized[:, None] - levels[None, :]).abs().argmin(dim=1)
    chosen_dist = (normalized - levels[codes.long()]).abs()
    best_dist = (normalized - levels[brute]).abs()
    assert torch.allclose(chosen_dist, best_dist, atol=1e-7)
    # Round trip: error within half the widest gap between levels, times the block absmax.
    recon = dequantize_nf(codes, absmax, bits, 64)
    gap = (levels[1:] - levels[:-1]).max() / 2
    assert torch.all((recon - w.reshape(-1)).abs().reshape(-1, 64) <= gap * absmax[:, None] + 1e-6)
