import pytest
import torch

from qbara.quant import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 64, 1001])
def test_pack_unpack_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.int64)
    packed = pack_bits(codes.to(torch.uint8), bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(numel, bits) == -(-numel * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, numel).long(), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_packing_is_msb_first_bit_stream(bits):
    codes = torch.randint(0, 2**bits, (40,), generator=torch.Generator().manual_seed(0))
    stream = "".join(format(int(c), f"0{bits}b") for c in codes)
    stream += "0" * ((-len(stream)) % 8)
    expected = [int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)]
    assert pack_bits(codes.to(torch.uint8), bits).tolist() == expected


def test_unsupported_width_is_refused():
    with pytest.raises(ValueError, match="supported widths"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), 6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_unpack_lookup_equals_indexing_the_unpacked_codes(bits, numel):
    from qbara.quant.packing import unpack_lookup

    gen = torch.Generator().manual_seed(bits * numel)
    codes = torch.randint(0, 2 ** bits, (numel,), generator=gen, dtype=torch.uint8)
    values = torch.randn(2 ** bits, generator=gen)
    looked_up = unpack_lookup(pack_bits(codes, bits), bits, numel, values)
    assert looked_up.shape == (numel,) and torch.equal(looked_up, values[codes.long()])
