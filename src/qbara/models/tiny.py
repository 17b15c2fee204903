"""Tiny random models with an offline byte-level tokenizer, for fast unit tests. Dimensions are multiples of 32
so group sizes 32 and 64 divide every linear's input features."""

from __future__ import annotations

import torch

from qbara.errors import QbaraError

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "IM_START", "IM_END", "SPECIAL_TOKENS", "tiny_llama", "tiny_architecture"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(model_max_length: int = 2048):
    """A byte-level tokenizer: bytes 0..255 then the special tokens; no merges, so text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for raw bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))

    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by ByteLevel pre-tokenization."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _check_dims(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> None:
    if min(hidden, layers, heads, kv_heads, intermediate) <= 0:
        raise QbaraError("tiny model dimensions must all be positive")
    if hidden % heads:
        raise QbaraError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if heads % kv_heads:
        raise QbaraError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")


def _vocab_size(tokenizer, vocab: int | None) -> int:
    n = len(tokenizer)
    if vocab is None:
        return n
    if vocab < n:
        raise QbaraError(f"vocab ({vocab}) must be at least the tokenizer size ({n})")
    return vocab


def _finish(model, tokenizer):
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.config.eos_token_id = eos
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = None
    if model.generation_config is not None:
        model.generation_config.eos_token_id = [eos, im_end]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = None
    model.eval()
    return model, tokenizer


def _build(config_cls, model_cls, seed: int, bias_std: float, hidden: int, layers: int, heads: int,
           kv_heads: int, intermediate: int, vocab: int | None, max_positions: int, tie_word_embeddings: bool,
           **extra):
    """A seeded random model of `model_cls` with the byte tokenizer; `bias_std` > 0 draws non-zero biases."""
    _check_dims(hidden, layers, heads, kv_heads, intermediate)
    tokenizer = byte_tokenizer(model_max_length=max_positions)
    config = config_cls(
        vocab_size=_vocab_size(tokenizer, vocab), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **extra)
    # Seed a private RNG stream so the caller's global RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if bias_std:
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, torch.nn.Linear) and module.bias is not None:
                        module.bias.normal_(0.0, bias_std)
    return _finish(model.float(), tokenizer)


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int | None = None, max_positions: int = 2048,
               tie_word_embeddings: bool = False):
    """A random ``LlamaForCausalLM`` (GQA) and its byte-level tokenizer, deterministic per seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(LlamaConfig, LlamaForCausalLM, seed, 0.0, hidden, layers, heads, kv_heads, intermediate, vocab,
                  max_positions, tie_word_embeddings)


def tiny_qwen2(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int | None = None, max_positions: int = 2048,
               tie_word_embeddings: bool = False):
    """A random ``Qwen2ForCausalLM`` (GQA, q/k/v biases drawn non-zero) and the byte-level tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(Qwen2Config, Qwen2ForCausalLM, seed, 0.02, hidden, layers, heads, kv_heads, intermediate, vocab,
                  max_positions, tie_word_embeddings, use_sliding_window=False)


# model_type -> (transformers config class, model class, config values its tiny model needs)
_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                                         "sliding_window": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def tiny_architecture(arch: str, tokenizer=None, seed: int = 0, layers: int = 2, **overrides):
    """A tiny random model of `arch` (one of the GGUF export's architectures) with `tokenizer`
    (default bytes); biases non-zero and norms drawn around their neutral value, so an export that drops them shows."""
    import transformers

    config_name, model_name, extra = _ARCHITECTURES[arch]
    tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        **{**extra, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).float().eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.05)
                elif "norm" in name:
                    param.normal_(0.0 if arch == "gemma3" else 1.0, 0.05)
    return model, tokenizer
