import pytest
import torch
from torch import nn

from qbara.errors import QbaraError
from qbara.lq.fisher import calibration_sequences, fisher_information, load_fisher, save_fisher


def test_fisher_hand_check_on_a_linear_model():
    """ℓ_n = ½||W x_n - y_n||² has gradient (W x_n - y_n) x_nᵀ: F = Σ_n ((W x_n - y_n) x_nᵀ)²."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    W = model[0].weight.detach().clone()
    xs, ys = torch.randn(5, 4), torch.randn(5, 3)
    examples = torch.cat([xs, ys], dim=1)  # one example = (x, y)

    def loss_fn(m, ex):
        return 0.5 * ((m(ex[:4]) - ex[4:]) ** 2).sum()

    fisher = fisher_information(model, examples, names=["0"], loss_fn=loss_fn, progress=False)
    expected = sum(torch.outer(W @ x - y, x) ** 2 for x, y in zip(xs, ys))
    assert set(fisher) == {"0"}
    assert torch.allclose(fisher["0"], expected, rtol=1e-5, atol=1e-7)
    # Per-example squares, not the square of the summed gradient.
    summed = sum(torch.outer(W @ x - y, x) for x, y in zip(xs, ys)) ** 2
    assert not torch.allclose(fisher["0"], summed)


def test_fisher_on_tiny_llama_matches_per_sequence_gradients(tmp_path):
    from qbara.models import tiny_llama

    model, tok = tiny_llama()
    model.train()  # restored afterwards
    seqs = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = fisher_information(model, seqs, progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert len(fisher) == 14  # 2 layers x 7 linears; lm_head is not a target
    for name, f in fisher.items():
        w = model.get_submodule(name).weight
        assert f.shape == w.shape and f.dtype == torch.float32
        assert (f >= 0).all() and f.sum() > 0
    # Hand check of one layer against explicit per-sequence backward passes.
    name = "model.layers.1.self_attn.v_proj"
    w = model.get_submodule(name).weight
    model.eval()
    expected = torch.zeros_like(w)
    for s in seqs:
        loss = model(input_ids=s[None], labels=s[None]).loss
        (g,) = torch.autograd.grad(loss, w)
        expected += g ** 2
    assert torch.allclose(fisher[name], expected, rtol=1e-4, atol=1e-12)

    path = save_fisher(fisher, tmp_path / "fisher.safetensors", {"sequences": 3})
    loaded = load_fisher(path)
    assert loaded.keys() == fisher.keys() and all(torch.equal(loaded[k], fisher[k]) for k in fisher)


def test_fisher_errors_and_calibration_windows(tmp_path):
    from safetensors.torch import save_file

    from qbara.models import tiny_llama

    model, tok = tiny_llama()
    with pytest.raises(QbaraError, match="no layer named"):
        fisher_information(model, torch.zeros(1, 4, dtype=torch.long), names=["nope"], progress=False)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(QbaraError, match="not a qbara Fisher file"):
        load_fisher(tmp_path / "other.safetensors")
    seqs = calibration_sequences(tok, "to be or not to be, that is the question. " * 5, 4, 16, seed=1)
    assert seqs.shape == (4, 16) and seqs.dtype == torch.long
    assert torch.equal(seqs, calibration_sequences(tok, "to be or not to be, that is the question. " * 5, 4, 16,
                                                   seed=1))
    with pytest.raises(QbaraError, match="fewer than"):
        calibration_sequences(tok, "short", 1, 64)


def test_fisher_of_quantized_layers_equals_the_dense_fisher_at_the_dequantized_weights():
    """No weight gradient is needed: QuantizedLinear layers get the Fisher of a dense model holding their
    dequantized weights (an independent computation through nn.Linear and autograd's weight gradients)."""
    from qbara import QuantConfig, QuantizedLinear, quantize_model
    from qbara.models import tiny_llama

    quantized, _ = tiny_llama()
    quantize_model(quantized, QuantConfig("nf4", 32))
    dense, _ = tiny_llama()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    seqs = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    got = fisher_information(quantized, seqs, progress=False)
    name = "model.layers.0.mlp.down_proj"
    w = dense.get_submodule(name).weight
    expected = torch.zeros_like(w)
    for s in seqs:
        (g,) = torch.autograd.grad(dense(input_ids=s[None], labels=s[None]).loss, w)
        expected += g ** 2
    assert len(got) == 14
    assert torch.allclose(got[name], expected, rtol=1e-4, atol=1e-12)


def test_fisher_in_shards_equals_the_fisher_in_memory(tmp_path):
    from qbara.models import tiny_llama

    model, _ = tiny_llama()
    seqs = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(6))
    whole = fisher_information(model, seqs, progress=False)
    biggest = max(f.numel() * 4 for f in whole.values())
    lazy = fisher_information(model, seqs, progress=False, folder=tmp_path / "fisher", max_bytes=2 * biggest)
    shards = sorted((tmp_path / "fisher").glob("fisher-*.safetensors"))
    assert len(shards) >= 4  # 14 matrices, at most two of the biggest per pass
    assert set(lazy) == set(whole)
    assert all(torch.equal(lazy[n], whole[n]) for n in whole)
    loaded = load_fisher(tmp_path / "fisher")
    assert all(torch.equal(loaded[n], whole[n]) for n in whole)
