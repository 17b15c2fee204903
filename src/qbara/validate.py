"""One validation layer for the files qbara reads: regular files of bounded size, UTF-8 text, JSON and YAML
of bounded nesting (YAML without aliases), no code or pickle from a model folder, sizes bounded before any
allocation. Every refusal is one QbaraError naming the file, the problem and the fix."""
from __future__ import annotations

import json
import math
import mmap
import stat
import struct
from pathlib import Path

import yaml
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qbara.errors import QbaraError

__all__ = ["SAFETENSORS_INDEX", "check_config_sizes", "check_config_values", "check_hf_folder", "check_no_remote_code",
           "check_tokenizer_config", "gguf_reader", "load_yaml_file", "parse_json", "read_json_file", "read_text_file",
           "regular_file", "short_repr", "safetensors_index_files", "safetensors_shapes"]

_MAX_DEPTH = 64                  # nesting of any JSON / YAML document qbara reads
_MAX_CONFIG_BYTES = 64 << 20     # a JSON or YAML config (tokenizer_config.json with a chat template included)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def regular_file(path, what: str = "file", max_bytes: int | None = None) -> Path:
    """`path` if it is a regular file (a symlink to one is followed) of at most `max_bytes`; a device such as
    /dev/zero, a pipe or a folder is refused before anything is read."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as err:
        raise QbaraError(f"{path}: cannot read the {what} ({err.strerror or err}); check the path") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, pipe or socket)"
        raise QbaraError(f"{path}: the {what} is {kind}; pass a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise QbaraError(f"{path}: the {what} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed; "
                         f"this is not a {what} (pass the right file)")
    return path


def read_text_file(path, what: str = "file", max_bytes: int | None = _MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a regular file; binary and non-UTF-8 (e.g. Latin-1) files are refused."""
    path = regular_file(path, what, max_bytes)
    try:
        with open(path, "rb") as fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    except OSError as err:
        raise QbaraError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise QbaraError(f"{path}: the {what} is larger than the {max_bytes:,} bytes allowed")
    if b"\x00" in data:
        raise QbaraError(f"{path}: the {what} is a binary file (NUL byte at offset {data.index(0)}), not text; "
                         f"pass a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise QbaraError(f"{path}: the {what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                         f"{err.start}); convert it to UTF-8") from None


def _check_depth(value, where: str, max_depth: int = _MAX_DEPTH) -> None:
    """Refuse a parsed JSON / YAML value nested deeper than `max_depth` lists and mappings."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise QbaraError(f"{where}: nested deeper than {max_depth} levels; no qbara file is, the data is "
                                 f"damaged or hostile")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))


def parse_json(text: str, where: str, max_depth: int = _MAX_DEPTH):
    """json.loads with one error for invalid JSON and a nesting bound (RecursionError never escapes)."""
    if text.count("[") + text.count("{") > max_depth:  # only then can it be too deep: walk it
        try:
            value = json.loads(text)
        except RecursionError:
            raise QbaraError(f"{where}: nested deeper than {max_depth} levels; no qbara file is, the data is "
                             f"damaged or hostile") from None
        except ValueError as err:
            raise QbaraError(f"{where}: not valid JSON ({err})") from None
        _check_depth(value, where, max_depth)
        return value
    try:
        return json.loads(text)
    except ValueError as err:
        raise QbaraError(f"{where}: not valid JSON ({err})") from None


def read_json_file(path, what: str = "JSON file", *, fix: str = "the file is damaged, write it again",
                   kind: type | None = dict, max_bytes: int = _MAX_CONFIG_BYTES, max_depth: int = _MAX_DEPTH):
    """A JSON file parsed with every check above; `kind` (default dict) is the required top-level type."""
    path = Path(path)
    try:
        value = parse_json(read_text_file(path, what, max_bytes), str(path), max_depth)
    except QbaraError as err:
        raise QbaraError(f"{err}; {fix}") from None
    if kind is not None and not isinstance(value, kind):
        wanted = {dict: "a JSON object", list: "a JSON list"}.get(kind, kind.__name__)
        raise QbaraError(f"{path}: the {what} must be {wanted}, got {type(value).__name__} {short_repr(value)}; {fix}")
    return value


def short_repr(value, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------- YAML


def load_yaml_file(path, what: str = "run config", max_bytes: int = 1 << 20, max_depth: int = _MAX_DEPTH):
    """A YAML file read with yaml's SafeLoader, aliases refused (no billion-laughs expansion) and nesting bounded."""
    path = Path(path)
    text = read_text_file(path, what, max_bytes)

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise QbaraError(f"{path}: YAML aliases are not supported in run configs (line {mark.line + 1}); "
                                 f"write the value out instead of *{self.peek_event().anchor}")
            self.depth += 1
            if self.depth > max_depth:
                raise QbaraError(f"{path}: nested deeper than {max_depth} levels; a run config has two")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            _refuse_duplicate_keys(self, node, path)
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise QbaraError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def _refuse_duplicate_keys(loader, node, path) -> None:
    """Refuse a YAML mapping that writes one key twice (yaml keeps the last silently): name the key and line."""
    lines: dict = {}
    for key_node, _ in node.value:
        key, line = loader.construct_object(key_node, deep=True), key_node.start_mark.line + 1
        try:
            if key in lines:
                raise QbaraError(f"{path}: the key {key!r} is written twice (lines {lines[key]} and {line}); YAML "
                                 f"would keep the last one silently: keep one")
            lines[key] = line
        except TypeError:  # an unhashable key: yaml's own constructor refuses it with its reason
            continue


# ---------------------------------------------------------------- model folders


def check_no_remote_code(folder) -> None:
    """Refuse a model folder whose config.json or tokenizer_config.json names custom code (`auto_map`):
    qbara never runs Python from a model folder."""
    folder = Path(folder)
    for name in ("config.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            continue
        data = read_json_file(folder / name, name, fix="the folder is damaged")
        if "auto_map" in data:
            raise QbaraError(f"{folder / name}: 'auto_map' asks to run the folder's own Python code; qbara never "
                             f"runs code from a model folder (trust_remote_code=False): use a model whose "
                             f"architecture transformers implements, or remove auto_map if it is not needed")


def _check_no_pickle_weights(folder) -> None:
    """Refuse a model folder whose weights are pickles (pytorch_model.bin, *.pt, ...): loading a pickle can
    run code. A folder with safetensors weights is fine (the pickles beside them are never read)."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise QbaraError(f"{folder}: its weights are pickle files ({', '.join(pickles[:3])}), which can run code "
                         f"when loaded; qbara reads safetensors only: convert them (e.g. load once in a trusted "
                         f"environment and save_pretrained(dir, safe_serialization=True))")


_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
_MAX_PARAMS_PER_BYTE = 16  # 0.5 bit per weight: below any quantization qbara writes or reads


# key -> (lowest, highest, whether each bound is allowed, the range in words) for the float settings a model's
# arithmetic depends on: a NaN or negative epsilon gives NaN losses and an infinite perplexity without an error.
_FLOAT_RANGES = {
    **dict.fromkeys(("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon"),
                    (0.0, 1.0, (False, False), "a finite number in (0, 1)")),
    "rope_theta": (0.0, math.inf, (False, False), "a finite number > 0"),
    "factor": (0.0, math.inf, (False, False), "a finite number > 0"),
    "initializer_range": (0.0, math.inf, (True, False), "a finite number >= 0"),
    "partial_rotary_factor": (0.0, 1.0, (False, True), "a finite number in (0, 1]"),
    **dict.fromkeys(("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"),
                    (0.0, 1.0, (True, False), "a finite number in [0, 1)")),
}
_HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
_ROPE_SECTIONS = ("rope_scaling", "rope_parameters")
# Switches transformers' config classes declare as bool: a number or string there is a damaged value (transformers
# itself refuses it with a multi-line validation error, or, in older versions, takes any truthy value as on).
_BOOL_FIELDS = ("tie_word_embeddings", "use_cache", "attention_bias", "mlp_bias", "use_sliding_window",
                "is_decoder", "is_encoder_decoder")


def check_config_values(config: dict, where) -> None:
    """Refuse a model config whose numbers would build a model that computes NaN or divides by zero: every
    number finite (list entries too, e.g. longrope's long_factor), epsilons / rope_theta / scaling factors in
    range, head counts positive and dividing evenly, switches true or false, token ids whole numbers."""
    for section in _config_sections(config):
        for key, value in section.items():
            _check_finite(where, key, value)
            if key in _FLOAT_RANGES and value is not None:
                _check_range(where, key, value, *_FLOAT_RANGES[key])
    _check_types(config, where)
    for key in _HEAD_FIELDS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            _refuse_value(where, key, value, "a positive whole number")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    hidden = config.get("hidden_size")
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if value and _is_whole(hidden) and value > hidden > 0:
            _refuse_value(where, key, value, f"at most hidden_size ({hidden})")
    if heads and isinstance(hidden, int) and config.get("head_dim") is None and hidden % heads:
        raise QbaraError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} (and no "
                         f"head_dim is given); the config is damaged")
    if heads and kv_heads and heads % kv_heads:
        raise QbaraError(f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}; "
                         f"the config is damaged")


def _check_finite(where, key, value) -> None:
    """Refuse a non-finite number, or a list (of lists) of numbers holding one, naming the entry."""
    if isinstance(value, float) and not math.isfinite(value):
        _refuse_value(where, key, value, "a finite number")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(where, f"{key}[{index}]", item)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(config: dict, where) -> None:
    """Switches are booleans; token ids (`*_token_id`) whole numbers, lists of them, or null."""
    for key in _BOOL_FIELDS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            _refuse_value(where, key, config[key], "true or false")
    for key, value in config.items():
        if key.endswith("_token_id") and value is not None and not (
                _is_whole(value) or (isinstance(value, list) and all(_is_whole(v) for v in value))):
            _refuse_value(where, key, value, "a token id (a whole number), a list of token ids, or null")


def _config_sections(config: dict):
    """The config and its nested rope settings (transformers 5 nests them per attention type)."""
    stack = [config]
    while stack:
        section = stack.pop()
        yield section
        for key in _ROPE_SECTIONS + ("full_attention", "sliding_attention"):
            if isinstance(section.get(key), dict):
                stack.append(section[key])


def _check_range(where, key, value, low, high, closed, words) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _refuse_value(where, key, value, words)
    above = value >= low if closed[0] else value > low
    below = value <= high if closed[1] else value < high
    if not (above and below and math.isfinite(value)):
        _refuse_value(where, key, value, words)


def _refuse_value(where, key, value, words) -> None:
    raise QbaraError(f"{where}: {key} is {short_repr(value)}, it must be {words}; the config is damaged (fix the "
                     f"value or get the model again)")


# tokenizer_config.json settings transformers compares or branches on at first use (a string model_max_length
# fails deep in tokenization): key -> (check, the value wanted in words)
_TOKENIZER_FIELDS = {
    "model_max_length": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                         and not (isinstance(v, float) and math.isnan(v)), "a positive number"),
    **dict.fromkeys(("clean_up_tokenization_spaces", "add_bos_token", "add_eos_token", "add_prefix_space", "legacy",
                     "split_special_tokens", "do_lower_case"), (lambda v: isinstance(v, bool), "true or false")),
    **dict.fromkeys(("padding_side", "truncation_side"), (lambda v: v in ("left", "right"), "'left' or 'right'")),
}


def check_tokenizer_config(folder) -> None:
    """Refuse a tokenizer_config.json whose settings have the wrong type (`_TOKENIZER_FIELDS`); a folder
    without one is fine."""
    where = Path(folder) / "tokenizer_config.json"
    if not (where.exists() or where.is_symlink()):
        return
    config = read_json_file(where, "tokenizer_config.json", fix="the folder is damaged")
    for key, (valid, words) in _TOKENIZER_FIELDS.items():
        if config.get(key) is not None and not valid(config[key]):
            raise QbaraError(f"{where}: {key} is {short_repr(config[key])}, it must be {words}; the tokenizer config "
                             f"is damaged (fix the value or copy the base model's tokenizer files into the folder)")


def check_config_sizes(config: dict, weights_bytes: int, where) -> None:
    """Refuse a config.json whose values are out of range (`check_config_values`), whose sizes are not positive
    whole numbers, or imply far more parameters than the weights file holds (e.g. vocab_size 10**9): checked
    before any model is built."""
    check_config_values(config, where)
    for key in _INT_FIELDS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise QbaraError(f"{where}: {key} must be a positive whole number, got {short_repr(value)}; the config "
                             f"is damaged")
    vocab, hidden = config.get("vocab_size") or 0, config.get("hidden_size") or 0
    layers, inner = config.get("num_hidden_layers") or 0, config.get("intermediate_size") or 0
    params = vocab * hidden + layers * (2 * hidden * hidden + 3 * hidden * inner)  # a lower bound
    if params > _MAX_PARAMS_PER_BYTE * weights_bytes + (1 << 24):
        raise QbaraError(f"{where}: describes a model of at least {params:,} parameters (vocab_size {vocab}, "
                         f"hidden_size {hidden}, {layers} layers) but its weights are {weights_bytes:,} bytes; "
                         f"the config does not belong to these weights (or they are truncated)")


def check_hf_folder(folder, weights: list[Path] | None = None) -> dict:
    """The config.json of a model folder after the checks above (custom code, pickle weights, sizes against the
    weights' bytes); `weights` defaults to the folder's *.safetensors files."""
    folder = Path(folder)
    check_no_remote_code(folder)
    config = read_json_file(folder / "config.json", "config.json", fix="the model folder is damaged")
    if not isinstance(config.get("model_type", ""), str):
        raise QbaraError(f"{folder / 'config.json'}: model_type must be a string, got "
                         f"{short_repr(config['model_type'])}")
    if weights is None:
        _check_no_pickle_weights(folder)
        weights = sorted(set(folder.glob("*.safetensors")) | set(safetensors_index_files(folder)))
    total = 0
    for file in weights:
        if file.exists():
            safetensors_shapes(file, "weights file")  # a header that fits the file: not empty, cut or random bytes
            total += file.stat().st_size
    check_config_sizes(config, total, folder / "config.json")
    return config


SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_index_files(folder) -> list[Path]:
    """The shard files a folder's model.safetensors.index.json names (none without an index), each present:
    a damaged index or a missing shard is refused here, not by transformers mid-load."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if not (index.exists() or index.is_symlink()):
        return []
    weight_map = read_json_file(index, "safetensors index", fix="the folder is damaged").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
                                                   for v in weight_map.values()):
        raise QbaraError(f"{index}: not a safetensors index (its weight_map must map tensor names to shard file "
                         f"names in the folder); the folder is damaged")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise QbaraError(f"{folder}: shards {missing[:3]} named by {SAFETENSORS_INDEX} are missing; the download is "
                         f"incomplete")
    return files


# ---------------------------------------------------------------- safetensors and GGUF headers


def safetensors_shapes(path, what: str = "safetensors file") -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, read without loading any tensor; the header's size and
    every data offset are checked against the file size."""
    path = regular_file(path, what)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise QbaraError(f"{path}: the {what} is {size} bytes, too short to be safetensors; write it again")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise QbaraError(f"{path}: the {what}'s header claims {length:,} bytes, past the file's end; the file "
                             f"is truncated or not safetensors, write it again")
        header = parse_json(fh.read(length).decode("utf-8", errors="replace"), str(path))
    if not isinstance(header, dict):
        raise QbaraError(f"{path}: the {what}'s header is not a JSON object; write it again")
    shapes, data = {}, size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not isinstance(shape, list)
                or not all(isinstance(v, int) and v >= 0 for v in offsets + shape)):
            raise QbaraError(f"{path}: the header entry of {name!r} is malformed; write the file again")
        if offsets[1] > data or offsets[0] > offsets[1]:
            raise QbaraError(f"{path}: tensor {name!r} ends at byte {offsets[1]:,} of a {data:,}-byte data section; "
                             f"the file is truncated or damaged, write it again")
        shapes[name] = tuple(shape)
    return shapes


_GGUF_MAGIC = b"GGUF"
_GGUF_DEFAULT_ALIGNMENT = 32
_GGUF_MAX_NESTING = 16  # arrays of arrays: real files nest none; gguf-py reads nesting recursively
# GGUF metadata value types (gguf's GGUFValueType numbering): the bytes of one value of each fixed-size type.
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
                    7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
# The fewest bytes one value of each type takes: a string its 8-byte length, an array its type and count.
_GGUF_MIN_BYTES = {**_GGUF_FIXED, _GGUF_STRING: 8, _GGUF_ARRAY: 12}


class _GGUFCursor:
    """Reads a GGUF file's tables front to back, refusing any length or count the bytes left cannot hold."""

    def __init__(self, path: Path, data, size: int):
        self.path, self.data, self.size, self.pos = path, data, size, 24

    def fail(self, what: str):
        raise QbaraError(f"{self.path}: {what}; the file is damaged or forged, use a GGUF file llama.cpp or "
                         f"qbara wrote")

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            self.fail(f"{what} claims {n:,} bytes but only {left:,} are left in the file")

    def unpack(self, fmt: str, what: str):
        self.need(struct.calcsize(fmt), what)
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", what)
        self.need(n, what)
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def value(self, vtype: int, key: str, depth: int = 0) -> None:
        """Step over one metadata value of type `vtype`."""
        if vtype in _GGUF_FIXED:
            self.need(_GGUF_FIXED[vtype], f"metadata key {key!r}")
            self.pos += _GGUF_FIXED[vtype]
        elif vtype == _GGUF_STRING:
            self.string(f"metadata key {key!r}'s string")
        elif vtype == _GGUF_ARRAY:
            self.array(key, depth)
        else:
            self.fail(f"metadata key {key!r} has value type {vtype}, which GGUF does not define")

    def array(self, key: str, depth: int) -> None:
        """Step over an array: its count checked against its elements' fewest bytes first, fixed-size
        elements skipped at once, strings and nested arrays walked."""
        if depth >= _GGUF_MAX_NESTING:
            self.fail(f"metadata key {key!r} nests arrays deeper than {_GGUF_MAX_NESTING} levels")
        etype = self.unpack("<I", f"metadata key {key!r}'s array type")
        count = self.unpack("<Q", f"metadata key {key!r}'s array length")
        if etype not in _GGUF_MIN_BYTES:
            self.fail(f"metadata key {key!r} is an array of value type {etype}, which GGUF does not define")
        left = self.size - self.pos
        if count * _GGUF_MIN_BYTES[etype] > left:
            self.fail(f"metadata key {key!r} claims an array of {count:,} {_GGUF_TYPE_NAMES[etype]} values "
                      f"({count * _GGUF_MIN_BYTES[etype]:,} bytes or more) but only {left:,} bytes are left in "
                      f"the file")
        if etype in _GGUF_FIXED:
            self.pos += count * _GGUF_FIXED[etype]
        elif etype == _GGUF_STRING:
            self.strings(key, count)
        else:
            for _ in range(count):
                self.array(key, depth + 1)

    def strings(self, key: str, count: int) -> None:
        """Step over `count` strings (a vocabulary: tens of thousands), each length within the file."""
        data, size, pos, length = self.data, self.size, self.pos, struct.Struct("<Q").unpack_from
        for index in range(count):
            if pos + 8 > size:
                self.fail(f"string {index:,} of metadata key {key!r} starts past the file's end ({size:,})")
            n = length(data, pos)[0]
            pos += 8 + n
            if pos > size:
                self.fail(f"string {index:,} of metadata key {key!r} claims {n:,} bytes, past the file's end "
                          f"({size:,})")
        self.pos = pos


def _gguf_tensor_bytes(type_id: int, n_elements: int, name: str, cursor: _GGUFCursor) -> int:
    try:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        cursor.fail(f"tensor {name!r} has ggml type {type_id}, which this gguf-py does not know")
    return n_elements * type_bytes // block


def _scan_gguf_tensors(cursor: _GGUFCursor, n_tensors: int, alignment: int) -> None:
    """Each tensor entry read and its data span (after the aligned tables) checked against the file's end."""
    entries = []
    for index in range(n_tensors):
        name = cursor.string(f"the name of tensor {index:,}").decode("utf-8", errors="replace")[:200]
        n_dims = cursor.unpack("<I", f"tensor {name!r}'s dimension count")
        cursor.need(n_dims * 8, f"tensor {name!r}'s {n_dims:,} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", cursor.data, cursor.pos)
        cursor.pos += n_dims * 8
        type_id, offset = cursor.unpack("<IQ", f"tensor {name!r}'s type and offset")
        entries.append((name, dims, type_id, offset))
    start = -(-cursor.pos // alignment) * alignment
    spans = []
    for name, dims, type_id, offset in entries:
        n_elements = 1
        for dim in dims:
            n_elements *= dim
        end = start + offset + _gguf_tensor_bytes(type_id, n_elements, name, cursor)
        if end > cursor.size:
            cursor.fail(f"tensor {name!r} (shape {list(dims)}) claims data up to byte {end:,}, past the file's "
                        f"end ({cursor.size:,})")
        spans.append((start + offset, end, name, dims))
    _check_packed(sorted(spans), cursor.size, alignment, cursor)


def _check_packed(spans: list, size: int, alignment: int, cursor: _GGUFCursor) -> None:
    """GGUF writers (gguf-py, llama.cpp) lay the tensors' data end to end, each padded to the alignment: a tensor
    whose type and shape take less than its slot (up to the next tensor, or the file's end) had its type or shape
    changed after writing, and would be read from the wrong bytes."""
    for (begin, end, name, dims), following in zip(spans, spans[1:] + [None]):
        slot_end = following[0] if following is not None else size
        if slot_end - end >= alignment:
            cursor.fail(f"tensor {name!r} (shape {list(dims)}) takes {end - begin:,} bytes but its slot in the file "
                        f"holds {slot_end - begin:,}; its type or shape was changed after the file was written")


def check_gguf_header(path) -> None:
    """Refuse a GGUF file any of whose counts or lengths cannot fit in its size, before gguf-py or transformers
    reads it: the header's counts, every metadata key and value (strings, arrays, nested arrays), every tensor
    entry and each tensor's data span. A forged count would make them loop or allocate for ever."""
    path = regular_file(path, "GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
        if len(head) < 24 or head[:4] != _GGUF_MAGIC:
            raise QbaraError(f"{path}: not a GGUF file (no GGUF header); pass a .gguf file llama.cpp or qbara "
                             f"wrote")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
        if version not in (2, 3):
            raise QbaraError(f"{path}: GGUF version {version} is not supported (2 or 3); the file is damaged or "
                             f"newer")
        # Each tensor entry takes at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes; each
        # key-value at least 8 (key length) + 4 (type) + 1 (value).
        if n_tensors * 24 + n_kv * 13 > size:
            raise QbaraError(f"{path}: the header claims {n_tensors:,} tensors and {n_kv:,} metadata entries, "
                             f"more than its {size:,} bytes can hold; the file is damaged")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _GGUFCursor(path, data, size)
            alignment = _scan_gguf_metadata(cursor, n_kv)
            _scan_gguf_tensors(cursor, n_tensors, alignment)


def _scan_gguf_metadata(cursor: _GGUFCursor, n_kv: int) -> int:
    """Step over the metadata entries; the data alignment they set (general.alignment), else the default."""
    alignment = _GGUF_DEFAULT_ALIGNMENT
    for index in range(n_kv):
        key = cursor.string(f"the key of metadata entry {index:,}").decode("utf-8", errors="replace")[:200]
        vtype = cursor.unpack("<I", f"metadata key {key!r}'s type")
        start = cursor.pos
        cursor.value(vtype, key)
        if key == "general.alignment" and vtype == 4:
            alignment = struct.unpack_from("<I", cursor.data, start)[0]
            if alignment == 0 or alignment & (alignment - 1):
                cursor.fail(f"general.alignment is {alignment}, not a power of two")
    return alignment


def gguf_reader(path):
    """gguf-py's reader of `path` after `check_gguf_header`; a file gguf-py still cannot read is a QbaraError."""
    check_gguf_header(path)
    try:
        return GGUFReader(str(path))
    except Exception as err:  # gguf-py raises ValueError, KeyError, IndexError... on damaged files
        raise QbaraError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}); the file is damaged or "
                         f"not GGUF") from None
