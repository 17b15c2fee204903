import pytest
import torch

from qbara.errors import QbaraError
from qbara.models import tiny_llama
from qbara.models.tiny import CHATML_TEMPLATE, byte_tokenizer, tiny_qwen2


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_same_seed_same_weights_other_seed_differs(factory):
    a, _ = factory(seed=0)
    b, _ = factory(seed=0)
    c, _ = factory(seed=1)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_global_rng_untouched():
    before = torch.get_rng_state()
    tiny_llama(seed=3)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_dimensions_fit_group_sizes(factory):
    model, tok = factory()
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == len(tok)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer + lm_head
    for lin in linears:
        assert lin.in_features % 64 == 0
        assert lin.weight.dtype == torch.float32
    attn = model.model.layers[0].self_attn
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert attn.k_proj.out_features == cfg.num_key_value_heads * head_dim  # GQA
    assert not model.training


def test_qwen2_has_nonzero_qkv_biases_llama_has_none():
    qwen, _ = tiny_qwen2()
    assert qwen.config.model_type == "qwen2"
    attn = qwen.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().sum() > 0
    assert attn.o_proj.bias is None
    llama, _ = tiny_llama()
    assert llama.config.model_type == "llama"
    assert all(m.bias is None for m in llama.modules() if isinstance(m, torch.nn.Linear))


def test_custom_dims_and_vocab():
    model, tok = tiny_llama(hidden=128, layers=3, heads=8, kv_heads=4, intermediate=256, vocab=320)
    assert model.config.vocab_size == 320
    assert model.lm_head.weight.shape == (320, 128)
    assert len(model.model.layers) == 3
    with pytest.raises(QbaraError, match="tokenizer size"):
        tiny_llama(vocab=100)
    with pytest.raises(QbaraError, match="divisible"):
        tiny_llama(heads=4, kv_heads=3)


def test_tied_option():
    model, _ = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied, _ = tiny_llama()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_tokenizer_bytes_roundtrip_and_specials():
    tok = byte_tokenizer()
    assert len(tok) == 256 + 4
    text = "Hello, wörld!  \t🎉\nline two"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # id == byte value
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"] == ids  # no BOS/EOS added by default
    special = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(special) == [256, 257, 258, 259]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 257
    assert tok("<|im_start|>x<|im_end|>")["input_ids"] == [258, ord("x"), 259]


def test_chat_template():
    _, tok = tiny_llama()
    assert tok.chat_template == CHATML_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tokenizer_save_load(tmp_path):
    from transformers import AutoTokenizer

    _, tok = tiny_qwen2()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "To be, or not to be"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id
    assert again.chat_template == tok.chat_template


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_forward_backward_generate(factory):
    model, tok = factory()
    ids = torch.tensor([tok("some text")["input_ids"]])
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    # Random init near-uniform: loss close to log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(float(len(tok)))).item()) < 0.5
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.eval()
    gen = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[0] == 1 and ids.shape[1] < gen.shape[1] <= ids.shape[1] + 4


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"])
def test_tiny_architecture_builds_each_export_architecture_deterministically(arch):
    from qbara.models.tiny import tiny_architecture

    model, tokenizer = tiny_architecture(arch, seed=1, layers=3)
    assert model.config.model_type == ("gemma3_text" if arch == "gemma3" else arch)
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == len(tokenizer)
    again, _ = tiny_architecture(arch, seed=1, layers=3)
    other, _ = tiny_architecture(arch, seed=2, layers=3)
    state, same, changed = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert not all(torch.equal(state[k], changed[k]) for k in state)
