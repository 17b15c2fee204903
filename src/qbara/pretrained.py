"""The top-level entries that take a model or a checkpoint name: `from_pretrained` (one call from a model name to a
quantized model with adapters, for PEFT habits), and `prepare` / `lq_prepare`, which stream a checkpoint folder
(`qbara.models.lq_stream`) and hand a model in memory to `qbara.prepare.prepare` / `qbara.prepare_lq.prepare_lq`."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from qbara.adapters.config import AdapterConfig
from qbara.adapters.io import adapter_base_quant, load_adapter, read_adapter_config
from qbara.errors import QbaraError
from qbara.lq.config import LQConfig
from qbara.models.loader import load_model
from qbara.models.lq_stream import stream_lq
from qbara.models.quantized_io import is_quantized_folder
from qbara.prepare import is_lq, lq_config_for
from qbara.prepare import prepare as prepare_model
from qbara.quant.config import QuantConfig
from qbara.state import state_of


def prepare(model: nn.Module | str | Path, quant: QuantConfig | Mapping[str, QuantConfig] | LQConfig, adapter=None,
            modules=None, progress: bool = False, factor_format: QuantConfig | None = None) -> nn.Module:
    """`qbara.prepare`: `qbara.prepare.prepare` (see it for every argument), which also takes a safetensors
    checkpoint folder (or "smollm2-135m") for LQ-LoRA / LoftQ (an LQConfig, or AdapterConfig(init="lq" |
    "loftq")): streamed from its shards without ever holding the dense model
    (`qbara.models.lq_stream.stream_lq`), bit-identical to the model loaded and prepared in memory.

        prepare("path/to/llama-7b", LQConfig(budget=2.75), AdapterConfig(rank=64))
    """
    if isinstance(model, (str, Path)) and is_lq(quant, adapter):
        lq = lq_config_for(quant, adapter, factor_format)
        return stream_lq(model, lq, adapter, modules=modules, progress=progress)[0]
    return prepare_model(model, quant, adapter, modules=modules, progress=progress, factor_format=factor_format)


def lq_prepare(model: nn.Module | str | Path, budget: float = 2.75, rank: int = 64,
               fisher: Mapping[str, Tensor] | str | Path | None = None, *, alpha: float = 16.0, dropout: float = 0.0,
               target_modules="all-linear",
               configs: Sequence[QuantConfig] | None = None, table=None, max_iters: int = 100,
               table_iters: int | None = None, seed: int = 0, workers: int | None = None,
               factor_format: QuantConfig | None = None, file_budget=None, importance=None,
               progress: bool = True) -> nn.Module:
    """LQ-LoRA on a dense causal LM (or a checkpoint folder, streamed), in place: shorthand for

        qbara.prepare(model, LQConfig(budget=budget, configs=configs, fisher=fisher, ...),
                      AdapterConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules))

    the primary form (see `qbara.lq.LQConfig` for every setting and `qbara.prepare_lq.prepare_lq` for the steps).
    Returns the model; `model.qbara.lq` holds the allocation and the per-matrix errors.
    """
    lq = LQConfig(budget=budget, configs=configs, fisher=fisher, max_iters=max_iters, table_iters=table_iters,
                  table=table, seed=seed, workers=workers, factor_format=factor_format, file_budget=file_budget,
                  importance=importance)
    adapter = AdapterConfig(method="lora", rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
    return prepare(model, lq, adapter, progress=progress)


def from_pretrained(name_or_path, quant=None, adapter=None, *, dtype=None, device="cpu", progress: bool = False):
    """(model, tokenizer): the base quantized as it is loaded (never dense in memory), adapters attached.

    quant: a QuantConfig (or layer name -> QuantConfig) for the base; None keeps a saved quantized folder as it is.
        With a PEFT adapter folder it is how that adapter's base was quantized (PEFT records no quantization).
    adapter: an AdapterConfig (new adapters to train; needs quant), or a folder qbara saved (loaded, with the
        quantization it records applied to a dense base; the chat template it records, its chat_template.jinja,
        becomes the tokenizer's), or a PEFT LoRA folder, or None. A PEFT folder whose
        base_model_name_or_path is a qbara quantized folder is refused on a dense base without quant.
    """
    if isinstance(adapter, AdapterConfig):
        if quant is None:
            raise QbaraError("new adapters need a quantized base: pass quant=QuantConfig(...) with "
                             "adapter=AdapterConfig")
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, quant=quant, progress=progress)
        return prepare_model(model, quant, adapter), tokenizer
    if adapter is not None and not isinstance(adapter, (str, Path)):
        raise QbaraError(f"adapter must be an AdapterConfig or an adapter folder, got {type(adapter).__name__}")
    if adapter is not None:
        quant = base_quant_for(name_or_path, adapter, quant)
    model, tokenizer = load_model(name_or_path, dtype=dtype, device=device, quant=quant, progress=progress)
    if adapter is not None:
        load_adapter(model, adapter)
    use_recorded_template(model, tokenizer)
    return model, tokenizer


def use_recorded_template(model, tokenizer) -> None:
    """Make the chat template the model's adapters were trained with (recorded in their folder, see
    `qbara.adapters.io.read_chat_template`) the tokenizer's, so that merging, exporting, evaluating and generating
    prompt the model as it was trained; adapters without one keep the tokenizer's own."""
    recorded = state_of(model).chat_template
    if recorded is not None and tokenizer is not None:
        tokenizer.chat_template = recorded


def base_quant_for(name_or_path, adapter, quant=None):
    """How to quantize the base `name_or_path` on load for the adapter folder `adapter`: as a qbara adapter
    records (`quant` must then be None); `quant` for a PEFT folder; None for a saved quantized folder (loaded as
    it is) or an adapter that needs the dense base."""
    if read_adapter_config(adapter, peft=True)["qbara"] is None:
        if quant is None:
            check_peft_base(name_or_path, adapter)
        return quant
    if quant is not None:
        raise QbaraError(f"{str(adapter)!r} is a qbara adapter: its record says how its base is quantized, so no "
                         f"quantization is given for it (drop quant= / --quant, which are for PEFT adapter folders)")
    return None if is_quantized_folder(name_or_path) else adapter_base_quant(adapter)


def check_peft_base(name_or_path, adapter) -> None:
    """Refuse the dense base `name_or_path` for a PEFT folder whose recorded base (base_model_name_or_path) is a
    qbara quantized folder: its LoRA was trained on that folder's quantized weights."""
    recorded = read_adapter_config(adapter, peft=True).get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or is_quantized_folder(name_or_path):
        return
    if is_quantized_folder(Path(recorded).expanduser()):
        raise QbaraError(f"{Path(adapter) / 'adapter_config.json'}: a PEFT adapter trained on the qbara-quantized "
                         f"base {recorded!r} (its base_model_name_or_path), but {str(name_or_path)!r} is not "
                         f"quantized; load that base (--model {recorded}), or give the base's quantization: "
                         f"--quant FORMAT[:BLOCK] on the CLI (e.g. --quant int4:32), quant=QuantConfig(...) in "
                         f"qbara.from_pretrained")
