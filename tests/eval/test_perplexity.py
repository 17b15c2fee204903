import math

import pytest
import torch

from qbara.errors import QbaraError
from qbara.eval.perplexity import PerplexityResult, make_windows, perplexity, text_perplexity
from qbara.models import tiny_llama
from qbara.models.tiny import tiny_qwen2


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


def _ids(n, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def _hand_nll(model, ids, window):
    """Independent reference: explicit log-softmax + gather, one window at a time, float64."""
    n_full = len(ids) // window
    chunks = [ids[i * window : (i + 1) * window] for i in range(n_full)] or [ids]
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logits = model(chunk.unsqueeze(0)).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp[torch.arange(len(chunk) - 1), chunk[1:]]
            total -= picked.sum().item()
            count += len(chunk) - 1
    return total / count, count, len(chunks)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_matches_hand_computation(factory):
    model, _ = factory(seed=2)
    ids = _ids(1000)
    res = perplexity(model, ids, window=128, progress=False)
    nll, count, n_windows = _hand_nll(model, ids, 128)
    assert isinstance(res, PerplexityResult)
    assert (res.windows, res.window, res.tokens) == (7, 128, 7 * 127) == (n_windows, 128, count)
    assert res.nll == pytest.approx(nll, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-6)


def test_trailing_partial_window_dropped(llama):
    model, _ = llama
    ids = _ids(300)
    full = perplexity(model, ids, window=100, progress=False)
    assert (full.windows, full.tokens) == (3, 297)
    # The last 50 tokens change nothing: they only form a partial window.
    noisy_tail = torch.cat([ids[:300], _ids(50, seed=9)])
    assert perplexity(model, noisy_tail, window=100, progress=False) == full


def test_short_stream_is_one_window(llama):
    model, _ = llama
    ids = _ids(50)
    res = perplexity(model, ids, window=128, progress=False)
    nll, count, _ = _hand_nll(model, ids, 128)
    assert (res.windows, res.window, res.tokens) == (1, 50, 49)
    assert res.nll == pytest.approx(nll, rel=1e-6)


def test_batch_size_does_not_change_result(llama):
    model, _ = llama
    ids = _ids(700)
    one = perplexity(model, ids, window=64, batch_size=1, progress=False)
    many = perplexity(model, ids, window=64, batch_size=4, progress=False)  # 10 windows: 4+4+2
    assert (one.tokens, one.windows) == (many.tokens, many.windows) == (630, 10)
    assert many.nll == pytest.approx(one.nll, rel=1e-5)


def test_max_tokens_truncates(llama):
    model, _ = llama
    ids = _ids(1000)
    cut = perplexity(model, ids, window=64, max_tokens=300, progress=False)
    assert cut == perplexity(model, ids[:300], window=64, progress=False)
    assert (cut.windows, cut.tokens) == (4, 4 * 63)


def test_uniform_model_gives_vocab_size():
    model, _ = tiny_llama(seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0 -> uniform distribution
    res = perplexity(model, _ids(200), window=50, progress=False)
    assert res.ppl == pytest.approx(model.config.vocab_size, rel=1e-5)
    assert res.nll == pytest.approx(math.log(model.config.vocab_size), rel=1e-6)


def test_no_grad_and_training_mode_restored(llama):
    model, _ = llama
    seen = []
    handle = model.register_forward_hook(lambda *a: seen.append(torch.is_grad_enabled()))
    model.train()
    try:
        perplexity(model, _ids(100), window=50, progress=False)
    finally:
        handle.remove()
        training = model.training
        model.eval()
    assert seen == [False, False]
    assert training is True


def test_progress_bar(llama, capsys):
    model, _ = llama
    res = perplexity(model, _ids(200), window=50, progress=True)
    assert res.windows == 4
    assert "perplexity" in capsys.readouterr().err


def test_window_beyond_context_rejected():
    model, _ = tiny_llama(max_positions=256)
    with pytest.raises(QbaraError, match="context length"):
        perplexity(model, _ids(1000), window=512, progress=False)
    assert perplexity(model, _ids(600), window=256, progress=False).windows == 2


def test_bad_inputs(llama):
    model, _ = llama
    with pytest.raises(QbaraError, match="1-D"):
        perplexity(model, _ids(100).reshape(10, 10), window=5, progress=False)
    with pytest.raises(QbaraError, match="at least 2"):
        perplexity(model, _ids(1), window=5, progress=False)
    with pytest.raises(QbaraError, match="window"):
        perplexity(model, _ids(10), window=1, progress=False)
    with pytest.raises(QbaraError, match="batch_size"):
        perplexity(model, _ids(10), window=5, batch_size=0, progress=False)
    with pytest.raises(QbaraError, match="integer"):
        perplexity(model, torch.rand(10), window=5, progress=False)


def test_make_windows():
    ids = torch.arange(10)
    assert make_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert make_windows(ids, 20).tolist() == [list(range(10))]
    assert make_windows(ids, 3, max_tokens=7).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_text_perplexity_uses_plain_token_ids(factory):
    model, tok = factory(seed=1)
    text = "Something is rotten in the state of Denmark. " * 10
    res = text_perplexity(model, tok, text, window=64, progress=False)
    ids = torch.tensor(list(text.encode()))  # byte tokenizer: ids are the bytes, no specials
    assert res == perplexity(model, ids, window=64, progress=False)
    assert res.windows == len(ids) // 64


@pytest.mark.slow
def test_smollm2_perplexity_on_hamlet():
    from qbara.data import shakespeare_text
    from qbara.models import load_model

    model, tok = load_model("smollm2-135m")
    text = shakespeare_text("hamlet")[5000:20000]
    res = text_perplexity(model, tok, text, window=256, max_tokens=512, progress=False)
    assert (res.windows, res.tokens) == (2, 510)
    assert math.isfinite(res.ppl) and 5 < res.ppl < 200  # uniform over 49152 tokens would be ~49152


def test_each_window_can_start_with_the_tokenizers_bos(llama):
    """bos=: every window is the BOS and window - 1 tokens of the stream, the BOS never scored; equal to the hand
    computation on those windows. text_perplexity passes the tokenizer's leading BOS (none for the tiny model)."""
    model, tokenizer = llama
    ids, bos, window = _ids(40), 1, 8
    result = perplexity(model, ids, window=window, bos=bos, progress=False)
    rows = [torch.cat([torch.tensor([bos]), ids[i * 7:(i + 1) * 7]]) for i in range(40 // 7)]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logp = torch.log_softmax(model(row.unsqueeze(0)).logits[0].double(), dim=-1)
            total -= logp[:-1].gather(1, row[1:, None]).sum().item()
            count += len(row) - 1
    assert result.tokens == count == 5 * 7 and result.window == window
    assert math.isclose(result.nll, total / count, rel_tol=1e-6)
    with pytest.raises(QbaraError, match="at least 3 tokens when each window starts with a BOS"):
        perplexity(model, ids, window=2, bos=bos, progress=False)
    text = "to be or not to be"
    plain = perplexity(model, torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]), window=8,
                       progress=False)
    assert text_perplexity(model, tokenizer, text, window=8, progress=False).nll == plain.nll
