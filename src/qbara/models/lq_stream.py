"""LQ-LoRA and LoftQ straight from a checkpoint's safetensors shards, never holding the dense model.

Three passes over the memory-mapped shards, each holding one matrix per worker thread:
1. (LQ-LoRA) the error table: every target matrix is read, its row of costs computed, and dropped;
   the ILP then picks a config per matrix under the bit budget;
2. the decompositions W ≈ Q + L1 L2 with the chosen configs (Q packed, L1 L2 fp32 kept);
3. quantize on load (`qbara.models.streaming`): the model skeleton is filled tensor by tensor, each target
   linear taking its decomposition's Q, the other weights keeping the checkpoint's dtype.
Then LoRA adapters start from the factors, so the model at step 0 is Q + L1 L2, identical to
`qbara.prepare(dense_model, LQConfig(...), AdapterConfig(...))`; `prepare` (and `lq_prepare`) given a folder
instead of a model run this path (`stream_lq`). Peak memory: the quantized model, the factors (rank·(m+k) fp32 values
per matrix), a Fisher matrix per worker when one is used, and each worker's matrix with its
decomposition temporaries (a few fp32 copies of one matrix).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from qbara.adapters.config import AdapterConfig
from qbara.errors import QbaraError
from qbara.fingerprint import model_fingerprint
from qbara.lazy_tensors import LazyTensors
from qbara.lq.config import LQConfig
from qbara.lq.filesize import FileBudget
from qbara.lq.prepare import decompose_layers, lq_report
from qbara.models.loader import embedded_folder, load_config, load_model, load_tokenizer
from qbara.models.quantized_io import is_quantized_folder
from qbara.models.streaming import (
    INDEX,
    SINGLE,
    _stream,
    checkpoint_dtype,
    checkpoint_files,
    default_compute_dtype,
    empty_model,
    safetensors_reader,
    use_compute_dtype,
)
from qbara.prepare_lq import choose_configs, finish_lq, plan_layers, resolve_file_budget
from qbara.quant.config import QuantConfig
from qbara.state import state_of
from qbara.validate import check_hf_folder

__all__ = ["load_lq", "stream_lq", "checkpoint_folder", "load_calibration_model"]


def checkpoint_file_budget(name_or_path, targets="all-linear", **kwargs):
    """`qbara.lq.filesize.FileBudget.of_model` for a safetensors checkpoint folder (or "smollm2-135m"), from its
    config alone (a skeleton without weights), after the folder's checks (`check_hf_folder`)."""
    folder = checkpoint_folder(name_or_path)
    if folder is None:
        raise QbaraError(f"{str(name_or_path)!r} is not a safetensors checkpoint folder; load the model and use "
                         f"FileBudget.of_model(model)")
    check_hf_folder(folder, checkpoint_files(folder))  # no custom code, values and sizes: before anything is built
    config = load_config(folder)
    skeleton = empty_model(config, torch.float32, folder)
    if getattr(config, "tie_word_embeddings", False):  # as loading does: the head is the embedding
        skeleton.tie_weights()
    return FileBudget.of_model(skeleton, targets, **kwargs)


def checkpoint_folder(name_or_path) -> Path | None:
    """The safetensors HF folder behind a model name (an embedded model's converted folder, or a folder with
    config.json and safetensors shards), or None when it has none to stream from (the in-memory test models, GGUF
    files, pickle checkpoints, qbara's quantized folders)."""
    embedded = embedded_folder(name_or_path)
    if embedded is not None:
        return embedded
    path = Path(str(name_or_path)).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file() or is_quantized_folder(path):
        return None
    return path if (path / SINGLE).is_file() or (path / INDEX).is_file() else None


def load_calibration_model(folder):
    """(model, tokenizer): the dense model of a safetensors folder kept in the checkpoint's dtype (2 bytes/param
    for bf16), every linear cast to fp32 per call on CPU: for the dense perplexity and the Fisher information,
    whose values equal those of an fp32 load of the same checkpoint."""
    model, tokenizer = load_model(str(folder), dtype=checkpoint_dtype(checkpoint_files(Path(folder))[0]))
    return use_compute_dtype(model, default_compute_dtype("cpu"), every_linear=True), tokenizer


def load_lq(name_or_path, *, method: str = "lq", budget: float = 2.75, rank: int = 64,
            fisher: Mapping[str, Tensor] | str | Path | None = None, quant: QuantConfig | None = None,
            alpha: float = 16.0, dropout: float = 0.0, target_modules="all-linear",
            configs: Sequence[QuantConfig] | None = None, table=None, max_iters: int = 100,
            table_iters: int | None = None, loftq_iters: int = 1, seed: int = 0, workers: int | None = None,
            factor_format: QuantConfig | None = None, file_budget=None, dtype: torch.dtype | None = None,
            device="cpu", progress: bool = True):
    """(model, tokenizer): LQ-LoRA (`method="lq"`, ILP allocation at `budget`) or LoftQ (`method="loftq"`,
    every linear on `quant`, adapters on `target_modules`) initialised from the checkpoint in a safetensors
    folder, streamed. Shorthand for `stream_lq(name_or_path, LQConfig(...), AdapterConfig(...))`, which
    `qbara.prepare(folder, LQConfig(...), AdapterConfig(...))` also runs (returning the model alone)."""
    common = dict(method=method, fisher=fisher, seed=seed, workers=workers, factor_format=factor_format,
                  file_budget=file_budget)
    if method == "loftq":
        lq = LQConfig(configs=quant, loftq_iters=loftq_iters, **common)
    else:
        lq = LQConfig(budget=budget, configs=configs, table=table, max_iters=max_iters, table_iters=table_iters,
                      **common)
    adapter = AdapterConfig(method="lora", rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
    return stream_lq(name_or_path, lq, adapter, dtype=dtype, device=device, progress=progress)


def stream_lq(name_or_path, lq, adapter, *, modules=None, dtype: torch.dtype | None = None, device="cpu",
              progress: bool = True):
    """(model, tokenizer): `qbara.prepare(load_model(folder), lq, adapter)` bit for bit (`qbara.lq.LQConfig`,
    `qbara.AdapterConfig`; `qbara.prepare_lq.prepare_lq` is the same path in memory), streamed from the
    checkpoint's shards (see the module doc), the non-quantized weights in the checkpoint's dtype (or `dtype`)."""
    adapter = lq.adapter_config(adapter)
    folder = checkpoint_folder(name_or_path)
    if folder is None:
        raise QbaraError(f"{name_or_path!r} is not a folder of safetensors shards to stream from; load the model "
                         f"(qbara.load_model) and pass it to lq_prepare / prepare instead")
    files = checkpoint_files(folder)
    check_hf_folder(folder, files)  # no custom code, sizes the weights can hold: before anything is built
    storage = dtype or checkpoint_dtype(files[0])
    config = load_config(folder)
    skeleton = empty_model(config, storage, folder)
    plan = plan_layers(skeleton, lq, adapter, modules)  # shapes, configs and rank checked on the skeleton
    del skeleton
    weights = LazyTensors.from_files(files, {n: f"{n}.weight" for n in plan.targets})
    fisher = lq.open_fisher()  # a file or folder is read one matrix at a time
    file = None if lq.fixed else resolve_file_budget(
        lq.file_budget, lambda: checkpoint_file_budget(folder, adapter.target_modules))
    importance = lq.open_importance()
    configs, allocation, table = choose_configs(plan, weights, lq, adapter.rank, file, fisher, progress, importance)
    decs = decompose_layers(weights, configs, adapter.rank, method=lq.method, max_iters=lq.max_iters,
                            loftq_iters=lq.loftq_iters, fisher=fisher, seed=lq.seed, workers=lq.workers,
                            progress=progress, importance=importance)
    quantized = configs if plan.layers is None else plan.layers  # the decomposed targets, and the rest plainly
    model = _stream(config, safetensors_reader(files), folder, quantized, "all-linear", storage, device, progress,
                    packed={n: dec.qtensor for n, dec in decs.items()}, importance=importance)
    state = state_of(model)
    dense_fingerprint = state.base_fingerprint
    state.lq = lq_report(lq.method, adapter.rank, decs, fisher=fisher is not None, settings=lq.report_settings())
    state.base_fingerprint = model_fingerprint(model)  # of the quantized base the factors fit
    state.loaded_quant = None  # the Q of decompositions, not a plain quantization of the checkpoint
    factors = {n: (dec.L1.to(device), dec.L2.to(device)) for n, dec in decs.items()}
    del decs
    finish_lq(model, factors, lq, adapter, allocation, table, file, dense_fingerprint)
    return model, load_tokenizer(folder)
