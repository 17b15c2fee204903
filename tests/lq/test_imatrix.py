"""`qbara.lq.importance_matrix`: llama-imatrix's statistic, the mean square of each target linear's input columns
over every calibration token (checked against forward hooks written here), for every linear but lm_head unless
`names=` selects, the model left as it was found; `save_importance` / `load_importance` round trip bit for bit
and refuse a safetensors file of another kind."""
import pytest
import torch
from safetensors.torch import save_file

from qbara import QbaraError
from qbara.lq import importance_matrix, load_importance, save_fisher, save_importance
from qbara.models.tiny import tiny_llama


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _reference(model, sequences, names):
    """name -> mean over every token of x² per input column, from the inputs forward hooks see (float64)."""
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0].detach()))
             for n in names]
    try:
        with torch.no_grad():
            for s in sequences:
                model(torch.as_tensor(s)[None])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        out[n] = (x * x).mean(0)
    return out


def _ids(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lengths]


def test_the_importance_matrix_is_the_mean_square_of_each_linears_input_columns():
    model = tiny_llama(seed=2)[0].eval()
    seqs = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    imatrix = importance_matrix(model, seqs, progress=False)
    linears = _linear_names(model)
    assert set(imatrix) == set(linears) - {"lm_head"} and len(imatrix) == 7 * len(model.model.layers)
    want = _reference(model, seqs, list(imatrix))
    for n, v in imatrix.items():
        assert v.dtype == torch.float32 and v.shape == (model.get_submodule(n).in_features,), n
        torch.testing.assert_close(v.double(), want[n], rtol=1e-6, atol=0.0, msg=n)
    # the layers see different inputs: not one vector repeated
    assert not torch.equal(imatrix["model.layers.0.mlp.down_proj"], imatrix["model.layers.1.mlp.down_proj"])
    assert imatrix["model.layers.0.mlp.down_proj"].shape == (model.config.intermediate_size,)


def test_sequences_of_different_lengths_are_averaged_over_every_token():
    """Mean over all tokens (a long sequence weighs more), not a mean of per-sequence means."""
    model = tiny_llama(seed=3)[0]
    seqs = _ids(model, (2, 13, 5), seed=3)
    imatrix = importance_matrix(model, seqs, progress=False)
    want = _reference(model, seqs, list(imatrix))
    for n, v in imatrix.items():
        torch.testing.assert_close(v.double(), want[n], rtol=1e-6, atol=0.0, msg=n)
    # ... which is not the mean of the per-sequence statistics
    per_seq = [importance_matrix(model, [s], progress=False) for s in seqs]
    n = "model.layers.1.self_attn.o_proj"
    mean_of_means = sum(p[n].double() for p in per_seq) / len(per_seq)
    assert not torch.allclose(imatrix[n].double(), mean_of_means, rtol=1e-3)
    weighted = sum(p[n].double() * len(s) for p, s in zip(per_seq, seqs)) / sum(len(s) for s in seqs)
    torch.testing.assert_close(imatrix[n].double(), weighted, rtol=1e-5, atol=0.0)


def test_names_select_the_layers():
    model = tiny_llama(seed=4)[0]
    seqs = _ids(model, (6, 6), seed=4)
    everything = importance_matrix(model, seqs, progress=False)
    names = ["model.layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj", "lm_head"]
    chosen = importance_matrix(model, seqs, names=names, progress=False)
    assert sorted(chosen) == sorted(names)
    for n in names[:2]:
        assert torch.equal(chosen[n], everything[n]), n
    torch.testing.assert_close(chosen["lm_head"].double(), _reference(model, seqs, ["lm_head"])["lm_head"],
                               rtol=1e-6, atol=0.0)
    assert chosen["lm_head"].shape == (model.config.hidden_size,)


@pytest.mark.parametrize("names, match", [
    (["model.layers.0.mlp.nope"], "no layer named 'model.layers.0.mlp.nope'"),
    (["model.layers.0.mlp"], "not a linear layer.*an importance matrix"),
])
def test_a_bad_name_is_refused(names, match):
    model = tiny_llama()[0]
    with pytest.raises(QbaraError, match=match):
        importance_matrix(model, _ids(model, (4,)), names=names, progress=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("training", [True, False])
def test_it_runs_in_eval_mode_and_leaves_the_mode_and_no_hooks_behind(training):
    model = tiny_llama(seed=5)[0]
    model.train(training)
    modes = []
    probe = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: modes.append(m.training))
    importance_matrix(model, _ids(model, (4, 3), seed=5), progress=False)
    probe.remove()
    assert modes == [False, False]  # every forward pass in eval mode (no dropout)
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_failing_forward_still_restores_the_mode_and_removes_the_hooks():
    model = tiny_llama(seed=5)[0].train()
    bad = [torch.tensor([1, 2, 3]), torch.tensor([model.config.vocab_size + 7])]  # out of the embedding
    with pytest.raises(IndexError):
        importance_matrix(model, bad, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_no_sequences_is_refused():
    with pytest.raises(QbaraError, match="no calibration sequences"):
        importance_matrix(tiny_llama()[0], [], progress=False)


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    model = tiny_llama(seed=6)[0]
    imatrix = importance_matrix(model, _ids(model, (7, 5), seed=6), progress=False)
    g = torch.Generator().manual_seed(6)
    imatrix["per_weight"] = torch.rand(32, 64, generator=g) * torch.logspace(-30, 30, 64)  # wide range, 2-D
    path = save_importance(imatrix, tmp_path / "imatrix.safetensors")
    assert path.is_file()
    back = load_importance(path)
    assert back.keys() == imatrix.keys()
    for n, v in imatrix.items():
        assert back[n].dtype == torch.float32 and torch.equal(back[n], v), n
    # a float64 / float16 input is stored as fp32
    save_importance({"a": torch.tensor([1.0, 2.5, 3.25], dtype=torch.float64),
                     "b": torch.tensor([0.5, 4.0], dtype=torch.float16)}, tmp_path / "other.safetensors")
    other = load_importance(tmp_path / "other.safetensors")
    assert torch.equal(other["a"], torch.tensor([1.0, 2.5, 3.25])) and other["a"].dtype == torch.float32
    assert torch.equal(other["b"], torch.tensor([0.5, 4.0])) and other["b"].dtype == torch.float32


def test_load_refuses_a_file_of_another_kind(tmp_path):
    tensors = {"model.layers.0.mlp.up_proj": torch.rand(128, 64)}
    fisher = save_fisher(tensors, tmp_path / "fisher.safetensors")
    with pytest.raises(QbaraError, match="not a qbara importance-matrix file.*save_importance"):
        load_importance(fisher)
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))  # no metadata at all
    with pytest.raises(QbaraError, match="save_importance"):
        load_importance(plain)
    with pytest.raises(QbaraError):
        load_importance(tmp_path / "missing.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(QbaraError):
        load_importance(damaged)
