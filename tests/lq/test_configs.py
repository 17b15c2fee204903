import itertools
import math
import random

import pytest

from qbara.lq.configs import candidate_configs, config_bits, pareto_front, qlora_config


def test_candidate_space_is_the_432_lq_lora_configs():
    configs = candidate_configs()
    assert len(configs) == 432 == len(set(configs))
    bits = config_bits(configs)
    assert min(bits) == pytest.approx(2.0322, abs=1e-4) and max(bits) == 8.625  # "2.03 to 8.63"
    assert {c.bits for c in configs} == {2, 3, 4, 8}
    assert {c.block_size for c in configs} == {16, 32, 64}
    assert {c.dq_bits for c in configs} == {2, 3, 4, 8}
    assert {c.dq_dtype for c in configs} == {"bf16", "fp16", "fp32"}
    assert {c.dq_block_size for c in configs} == {16, 64, 256}
    assert all(c.double_quant and c.kind == "nf" for c in configs)
    assert qlora_config(4) in configs and round(qlora_config(4).bits_per_param, 3) == 4.127
    assert qlora_config(3) in configs and round(qlora_config(3).bits_per_param, 3) == 3.127
    # Configs sharing (b, B0) are contiguous, 36 each.
    keys = [(c.bits, c.block_size) for c in configs]
    assert [k for k, _ in itertools.groupby(keys)] == list(dict.fromkeys(keys)) and len(set(keys)) == 12


def _dominated(i, bits, errors):
    return any((bits[j] <= bits[i] and errors[j] <= errors[i]) and (bits[j] < bits[i] or errors[j] < errors[i])
               for j in range(len(bits)) if j != i)


def test_pareto_front_matches_the_definition():
    rng = random.Random(0)
    for _ in range(200):
        m = rng.randint(1, 12)
        bits = [rng.choice([2.0, 2.5, 3.0, 4.0, 8.5]) for _ in range(m)]
        errors = [rng.choice([1.0, 2.0, 3.0, 5.0, math.inf]) for _ in range(m)]
        kept = pareto_front(bits, errors)
        finite = [i for i in range(m) if math.isfinite(errors[i])]
        expected_pairs = {(bits[i], errors[i]) for i in finite if not _dominated(i, bits, errors)}
        assert {(bits[i], errors[i]) for i in kept} == expected_pairs
        assert len(kept) == len(expected_pairs)  # exact duplicates kept once
        assert [bits[i] for i in kept] == sorted(bits[i] for i in kept)
        assert all(errors[a] > errors[b] for a, b in zip(kept, kept[1:]))


def test_pareto_front_length_mismatch():
    with pytest.raises(ValueError):
        pareto_front([1.0, 2.0], [1.0])
