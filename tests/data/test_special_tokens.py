"""data.special_tokens: which tokenizers put a BOS before every text (Gemma's do; SmolLM2's and the tiny test
models' do not), and calibration windows that start with it where they do."""
import torch

from qbara.data.special_tokens import adds_token, leading_bos
from qbara.lq.fisher import calibration_sequences
from qbara.models import tiny_llama


class CharTokenizer:
    """One id per character (ord); with `bos`, encoding with special tokens puts it first, as Gemma's does."""

    def __init__(self, bos=None):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else [])
                + ids}


def test_leading_bos_only_where_the_tokenizer_adds_one():
    assert leading_bos(CharTokenizer(bos=2)) == 2 and leading_bos(CharTokenizer()) is None
    _, tiny = tiny_llama()
    assert leading_bos(tiny) is None
    assert not adds_token(CharTokenizer(bos=2), 2, -1)  # first, not last


def test_calibration_windows_start_with_the_bos_the_model_reads_text_after():
    text = "to be or not to be, that is the question. " * 5
    plain = calibration_sequences(CharTokenizer(), text, 4, 16, seed=1)
    with_bos = calibration_sequences(CharTokenizer(bos=2), text, 4, 16, seed=1)
    assert plain.shape == with_bos.shape == (4, 16)
    assert (with_bos[:, 0] == 2).all() and not (plain == 2).any()
    ids = torch.tensor([ord(c) for c in text])
    for row in with_bos[:, 1:]:  # the rest: 15 consecutive tokens of the text
        assert any(torch.equal(row, ids[s:s + 15]) for s in range(len(ids) - 14))
