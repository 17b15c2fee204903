"""The training run: HF Trainer on a prepared (quantized + adapters) model, saving adapters only.

Checkpoints hold the adapter (PEFT layout), optimizer, scheduler, RNG and trainer state. A checkpoint
counts only once its `qbara_complete.json` marker is written (atomically, last). Each checkpoint folder gets
qbara's `.qbara-saving` marker first: a run killed while saving leaves a folder with it and without the completion
marker, which `--resume` ignores and removes; a `checkpoint-N` folder without it is not qbara's and is never
removed or written into. Resuming from a checkpoint at the run's last step writes the final outputs from it.

The final adapter folder is built beside `adapter/` and swapped in (`qbara.outputs`), so a kill leaves the
complete old or new one. A non-finite training loss or final adapter stops the run before anything final is
written; a write fault (disk full, file size limit) is one line.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qbara.adapters.attach import adapter_layers, trainable_parameter_count
from qbara.adapters.io import (
    check_base_fingerprint,
    copy_adapter_weights,
    load_adapter,
    read_adapter_config,
    read_chat_template,
    save_adapter,
)
from qbara.atomic import write_json_atomic
from qbara.errors import QbaraError
from qbara.memory import bound_heap_growth
from qbara.models.loader import base_model_path, load_model, load_model_tokenizer
from qbara.models.quantized_io import is_quantized_folder
from qbara.native import save_quantized
from qbara.outputs import (
    OutputLock,
    check_output,
    foreign_files,
    mark_folder,
    output_lock,
    write_faults_as_errors,
)
from qbara.plotting import pyplot, save_figure
from qbara.preparation import prepare
from qbara.pretrained import base_quant_for
from qbara.prompt_formats import resolve_template
from qbara.quant.config import QuantConfig
from qbara.state import state_of
from qbara.train.config import RunConfig
from qbara.train.data import ExampleDataset, PadCollator, build_examples, detect_format, read_records
from qbara.train.fsdp import (
    fsdp_mode,
    full_adapter_parameters,
    full_optimizer_state,
    is_sharded,
    load_full_optimizer_state,
    local_packed_bytes,
    rank_local_loading,
    shard_model,
)
from qbara.train.plan import base_quant, epoch_steps, meta_model, trainable_parameters
from qbara.validate import read_json_file, safetensors_shapes

__all__ = ["TrainInterrupted", "TrainResult", "check_before_load", "check_train_output", "latest_complete_checkpoint",
           "load_datasets", "prepare_for_training", "refuse_checkpoints", "train", "training_arguments"]

COMPLETE_MARKER = "qbara_complete.json"
_SAVING_MARKER = ".qbara-saving"  # written first into each checkpoint folder qbara saves
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(output_dir) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every checkpoint folder, by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child, (child / COMPLETE_MARKER).is_file()))
    return sorted(found)


def latest_complete_checkpoint(output_dir) -> Path | None:
    complete = [path for _, path, done in _checkpoints(output_dir) if done]
    return complete[-1] if complete else None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_record(folder: Path) -> dict:
    """Relative path -> size and SHA-256 of every file of a checkpoint (the marker excepted), recorded in its
    marker so that `checkpoint_problem` finds a file truncated, replaced or removed since."""
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _file_sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE_MARKER}


_REQUIRED = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json")


def checkpoint_problem(folder: Path) -> str | None:
    """Why the marked checkpoint `folder` cannot be resumed from (None if it can): its marker unreadable, a
    file it lists missing, of another size or hash, the trainer state or adapter unreadable; for markers of
    older versions (no file list), torch's zip files are checked for truncation."""
    try:
        marker = read_json_file(folder / COMPLETE_MARKER, COMPLETE_MARKER)
        files = marker.get("files")
        for rel, record in (files or {}).items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if not isinstance(record, dict) or path.stat().st_size != record.get("size"):
                return f"{rel} is {path.stat().st_size:,} bytes, {record.get('size')!r} were written"
            if _file_sha256(path) != record.get("sha256"):
                return f"{rel} differs from the file written (SHA-256)"
        for name in _REQUIRED:
            if not (folder / name).is_file():
                return f"{name} is missing"
        state = read_json_file(folder / "trainer_state.json", "trainer_state.json")
        if isinstance(state.get("global_step"), bool) or not isinstance(state.get("global_step"), int):
            return "trainer_state.json has no global_step"
        safetensors_shapes(folder / "adapter_model.safetensors")
        if files is None:  # an older marker: check torch's zip archives (optimizer, scheduler, RNG) end to end
            for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
                try:
                    with zipfile.ZipFile(path) as archive:
                        bad = archive.testzip()
                except (zipfile.BadZipFile, OSError) as err:
                    return f"{path.name} is not a complete torch file ({err})"
                if bad is not None:
                    return f"{path.name} is damaged ({bad} fails its CRC)"
    except QbaraError as err:
        return str(err).replace(f"{folder}/", "")
    return None


def _resumable_checkpoint(output_dir) -> Path | None:
    """The newest marked checkpoint that is intact; each damaged one newer than it is reported and set aside
    as `checkpoint-N.damaged` (kept for inspection; its step will be saved again)."""
    complete = [(step, path) for step, path, done in _checkpoints(output_dir) if done]
    damaged = []
    for step, path in reversed(complete):
        problem = checkpoint_problem(path)
        if problem is None:
            break
        damaged.append((step, path, problem))
    else:
        step, path = None, None
    for bad_step, bad_path, why in damaged:
        kept = _set_aside(bad_path)
        then = f"resuming from checkpoint {step}" if path else "no intact checkpoint left, starting anew"
        print(f"qbara: checkpoint {bad_step} is damaged ({why}): {then} (kept as {kept.name})", file=sys.stderr)
    return path


def _set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the way (checkpoint-N.damaged, -N.damaged.2, ...)."""
    target, n = folder.with_name(folder.name + ".damaged"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged.{n}")
    folder.rename(target)
    return target


def _remove_incomplete_checkpoints(output_dir) -> list[Path]:
    """Remove the checkpoint folders a killed save left (qbara's saving marker, no completion marker); a
    `checkpoint-N` folder without qbara's marker is not qbara's and is left alone."""
    removed = [path for _, path, done in _checkpoints(output_dir) if not done and _saving_marked(path)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _saving_marked(folder: Path) -> bool:
    return (folder / _SAVING_MARKER).is_file() and not (folder / _SAVING_MARKER).is_symlink()


def start_checkpoint(folder: Path) -> None:
    """Create the checkpoint folder `folder` with qbara's saving marker in it, before anything else is written
    there; a folder of that name qbara did not start is refused (never written into, never removed)."""
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir() or folder.is_symlink() or not _saving_marked(folder):
            raise QbaraError(f"{folder} exists and was not written by qbara; the run would save its checkpoint "
                             f"there: move it out of {folder.parent} and resume")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / _SAVING_MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)


def _trainer_class():
    from transformers import Trainer

    class QbaraTrainer(Trainer):
        """HF Trainer that saves and restores only the adapter, and marks finished checkpoints."""

        def _save(self, output_dir=None, state_dict=None):
            save_adapter(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            _load_adapter_weights(model or self.model, resume_from_checkpoint)

        def save_model(self, output_dir=None, _internal_call=False):
            if not is_sharded(self.model):
                return super().save_model(output_dir, _internal_call)
            with full_adapter_parameters(self.model):  # every rank gathers, the main one writes
                if self.args.should_save:
                    self._save(output_dir)

        def _save_optimizer_and_scheduler(self, output_dir):
            if not is_sharded(self.model):
                return super()._save_optimizer_and_scheduler(output_dir)
            state = full_optimizer_state(self.model, self.optimizer)  # whole tensors by name, on rank 0
            if self.args.should_save:
                torch.save(state, os.path.join(output_dir, _OPTIMIZER))
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, _SCHEDULER))

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or not is_sharded(self.model):
                return super()._load_optimizer_and_scheduler(checkpoint)
            state = torch.load(os.path.join(checkpoint, _OPTIMIZER), map_location="cpu", weights_only=True)
            load_full_optimizer_state(self.model, self.optimizer, state)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, _SCHEDULER), weights_only=True))

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            if not torch.isfinite(loss).all():
                raise QbaraError(f"the training loss is {loss.float().mean().item()} at step "
                                 f"{self.state.global_step + 1}; {_NOT_FINITE_FIX}")
            return loss

        def _save_checkpoint(self, model, trial):
            if self.args.should_save:
                start_checkpoint(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}")
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                write_json_atomic(folder / COMPLETE_MARKER, {"step": self.state.global_step,
                                                             "files": _checkpoint_record(folder)})
                complete = [p for _, p, done in _checkpoints(self.args.output_dir) if done]
                for old in complete[: max(0, len(complete) - self.qbara_keep)]:
                    shutil.rmtree(old, ignore_errors=True)

    return QbaraTrainer


_OPTIMIZER, _SCHEDULER = "optimizer.pt", "scheduler.pt"  # HF Trainer's names in a checkpoint
_NOT_FINITE_FIX = ("training diverged or the model computes non-finite values (check the model's config.json, "
                   "e.g. rms_norm_eps, and lower train.lr); no final adapter was written and the previous output "
                   "is kept")


def _check_resume_base(model, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint trained on another base model, another quantization of it, with another
    adapter or on prompts rendered with another chat template."""
    info = read_adapter_config(checkpoint)["qbara"]
    check_base_fingerprint(info, model, str(checkpoint),
                           "resume with the run's original model.name and quant settings", required=True)
    recorded = info.get("adapter")
    current = state_of(model).adapter_config
    if current is not None and recorded != current.to_dict():
        raise QbaraError(f"{checkpoint} holds a {recorded} adapter but this run attaches {current.to_dict()}; "
                         f"resume with the run's original adapter settings")
    _check_resume_quant(model, checkpoint, info.get("layers") or {})
    trained_with = read_chat_template(checkpoint)  # None for checkpoints of older versions
    if trained_with is not None and trained_with != state_of(model).chat_template:
        raise QbaraError(f"{checkpoint} was trained on prompts rendered with another chat template (its "
                         f"chat_template.jinja) than this run's data.template renders; resume with the run's original "
                         f"data.template and data.format")


def _check_resume_quant(model, checkpoint: Path, records: dict) -> None:
    """Refuse a base quantized otherwise than the one the checkpoint was trained on (per layer)."""
    def label(quant: dict | None) -> str:
        return QuantConfig.from_dict(quant).label if quant is not None else "not quantized"

    for name, layer in adapter_layers(model).items():
        record = records.get(name)
        if not isinstance(record, dict) or "quant" not in record:
            continue
        quant = layer.quant_config
        current = quant.to_dict() if quant is not None else None
        if record.get("quant") != current:
            raise QbaraError(f"{checkpoint} was trained on a base quantized as {label(record.get('quant'))} "
                             f"(layer {name}) but this run quantizes it as {label(current)}; resume with the "
                             f"run's original quant settings, or train into a new train.output_dir")


def _check_finite_adapter(model) -> None:
    """Refuse to save an adapter with a NaN or infinite weight."""
    for name, layer in adapter_layers(model).items():
        for pname, param in layer.adapter_parameters().items():
            if not torch.isfinite(param.detach()).all():
                raise QbaraError(f"the trained adapter's {name}.{pname} holds non-finite values; {_NOT_FINITE_FIX}")


def _load_adapter_weights(model, directory) -> None:
    """Copy the adapter tensors saved in `directory` into the model's existing adapter parameters (a sharded
    model: into whole copies, then back into each rank's shards)."""
    model = getattr(model, "module", model)
    with full_adapter_parameters(model, write_back=True):  # a no-op on a model that is not sharded
        copy_adapter_weights(adapter_layers(model), directory)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    trainable_parameters: int
    log_history: list
    final_loss: float | None
    folds: bool = False  # every adapter folds exactly into its quantized base (merge --into quantized)


def training_arguments(config: RunConfig, has_eval: bool, resume: bool = False):
    """The HF TrainingArguments of the run; a run that evaluates also does so once before its first step (the
    step-0 point of the eval curve), except when it resumes from a checkpoint."""
    from transformers import TrainingArguments

    t = config.train
    checkpointing = {}
    if t.gradient_checkpointing:
        fields = TrainingArguments.__dataclass_fields__
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        checkpointing = {name: True, f"{name}_kwargs" if f"{name}_kwargs" in fields
                         else "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    # transformers 5 has no warmup_ratio: there a warmup_steps below 1 is the fraction of the run.
    warmup = {"warmup_steps": t.warmup_ratio or t.warmup_steps}
    if "warmup_ratio" in TrainingArguments.__dataclass_fields__:
        warmup = {"warmup_ratio": t.warmup_ratio, "warmup_steps": t.warmup_steps}
    on_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=t.output_dir, max_steps=t.steps, num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        lr_scheduler_type=t.scheduler, **warmup, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim=t.optim, seed=t.seed, data_seed=t.seed, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=None, logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps or None, eval_on_start=bool(has_eval and t.eval_steps and not resume),
        **checkpointing, bf16=t.bf16, disable_tqdm=not t.progress,
        report_to=[r.strip() for r in t.report_to.split(",") if r.strip()], use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and distributed else None, remove_unused_columns=False, dataloader_num_workers=0,
        save_only_model=False, full_determinism=False,
    )


def load_datasets(config: RunConfig, tokenizer):
    """(train, eval or None) datasets; instruction and chat records are rendered with data.template, resolved
    once for both (each dataset's `chat_template` is its Jinja text, None for packed text)."""
    d = config.data
    if not d.train:
        raise QbaraError("no training data: set data.train to a .jsonl/.json/.csv/.txt file")
    records = read_records(d.train)
    if d.max_records:
        records = records[: d.max_records]
    eval_records = read_records(d.eval) if d.eval else []
    if not eval_records and d.held_out > 0 and d.format != "text":
        cut = max(1, int(round(len(records) * d.held_out)))
        records, eval_records = records[:-cut], records[-cut:]
    fmt = d.format if d.format != "auto" else detect_format(records)
    template = resolve_template(d.template, tokenizer) if fmt != "text" else None
    text = template.text if template is not None else None
    train = build_examples(records, tokenizer, fmt, d.max_length, d.on_error, source=d.train, template=template)
    held = (build_examples(eval_records, tokenizer, fmt, d.max_length, d.on_error, source=d.eval or "held-out",
                           template=template) if eval_records else [])
    return ExampleDataset(train, text), (ExampleDataset(held, text) if held else None)


def _quant_on_load(config: RunConfig):
    """What to quantize the base with while loading it (never a dense copy of the model): the run's quant, or
    the starting adapter's recorded one; None for a quantized folder or a LoftQ / LQ init (needs the dense
    weights)."""
    if config.model.adapter:
        return base_quant_for(config.model.name, config.model.adapter)
    if is_quantized_folder(config.model.name):
        return None
    return config.quant_config() if config.adapter_config().init == "default" else None


def _check_context(config: RunConfig, model_config) -> None:
    """Refuse a data.max_length longer than the model's context (its config's max_position_embeddings)."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context and config.data.max_length > context:
        raise QbaraError(f"data.max_length={config.data.max_length} exceeds the model's context of {context} "
                         f"tokens; set data.max_length <= {context}")


def check_before_load(config: RunConfig):
    """Every check of the run that needs no weights, before minutes of loading (its config's sections were checked
    when it was read): the starting adapter, the context, the quantization and adapters of every target layer (on
    the model built from its config.json or GGUF metadata on the meta device: `qbara.train.plan`); returns the
    tokenizer `load_model` will return, read from the model's tokenizer files, to build the data with."""
    _quant_on_load(config)  # reads model.adapter's record
    model, model_config = meta_model(config)
    _check_context(config, model_config)
    trainable_parameters(config, model, base_quant(config, model)[0])  # block sizes, targets, pooling
    return load_model_tokenizer(config.model.name)


def prepare_for_training(config: RunConfig, model, tokenizer):
    """Quantize and attach adapters as the config says (seeded)."""
    from transformers import set_seed

    _check_context(config, model.config)
    set_seed(config.train.seed)
    if config.model.adapter:
        print(f"qbara: starting from the adapter in {config.model.adapter} (the adapter section is not used)")
        return load_adapter(model, config.model.adapter)
    return prepare(model, config.quant_config(), config.adapter_config(), progress=config.train.progress)


def train(config: RunConfig, resume: bool = False, model=None, tokenizer=None) -> TrainResult:
    """Run (or resume) the training described by `config`; returns where the adapter was written.

    The output folder follows `qbara.outputs`' rule (checked before any work: not an input, not the
    working folder, not a non-empty folder qbara did not write unless train.overwrite) and is locked for
    the run, so a second run on it fails at once.
    """
    output_dir = Path(config.train.output_dir)
    out = check_train_output(config)
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        with output_lock(out) if main_rank else contextlib.nullcontext() as lock:
            return _train(config, resume, model, tokenizer, output_dir, lock)
    except KeyboardInterrupt as stop:
        if isinstance(stop, TrainInterrupted):
            raise
        raise TrainInterrupted(None, _last_checkpoint_step(output_dir)) from None


def check_train_output(config: RunConfig) -> Path:
    """train.output_dir checked by `qbara.outputs`' rule (see `train`); its checkpoints (those of an older qbara
    without the manifest, or of a run interrupted before it wrote one) make it qbara's."""
    output_dir = Path(config.train.output_dir)
    inputs = [config.model.name, config.model.adapter, config.data.train, config.data.eval]
    ours = any(done or _saving_marked(path) for _, path, done in _checkpoints(output_dir))
    return check_output(output_dir, inputs, overwrite=config.train.overwrite or ours, option="train.output_dir")


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during `train`: the optimizer step reached (None before training started) and the step of the last
    complete checkpoint (None without one), for the one-line notice and its --resume hint."""

    def __init__(self, step: int | None, checkpoint: int | None):
        super().__init__("interrupted")
        self.step, self.checkpoint = step, checkpoint


def refuse_checkpoints(output_dir: Path) -> None:
    """A run without --resume does not train into a folder holding complete checkpoints."""
    if latest_complete_checkpoint(output_dir):
        raise QbaraError(f"{output_dir} already holds checkpoints; pass --resume to continue, or choose another "
                         f"train.output_dir")


def _last_checkpoint_step(output_dir: Path) -> int | None:
    complete = [step for step, _, done in _checkpoints(output_dir) if done]
    return complete[-1] if complete else None


def _train(config: RunConfig, resume: bool, model, tokenizer, output_dir: Path,
           lock: OutputLock | None) -> TrainResult:
    # The user's files in an --overwrite folder stay theirs; checkpoints of an older qbara are ours.
    foreign = {f for f in foreign_files(output_dir) if not _CHECKPOINT.match(f.split("/", 1)[0])}

    checkpoint = None
    if resume:
        removed = _remove_incomplete_checkpoints(output_dir)
        if removed:
            print(f"qbara: removed incomplete checkpoints {[p.name for p in removed]}")
        checkpoint = _resumable_checkpoint(output_dir)
        print(f"qbara: resuming from {checkpoint}" if checkpoint else "qbara: no checkpoint to resume, starting anew")
    else:
        refuse_checkpoints(output_dir)
    # The data and every check that needs no weights come first: a bad record costs no model load.
    sharding = fsdp_mode(config.train.fsdp)  # before the TrainingArguments: an accelerate FSDP launch is ours
    if sharding and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise QbaraError("train.fsdp: full_shard needs several ranks: launch with torchrun --nproc_per_node N "
                         "(or accelerate launch), or leave train.fsdp empty")
    loaded = model is None
    train_set, eval_set = load_datasets(config, check_before_load(config) if loaded else tokenizer)
    args = training_arguments(config, eval_set is not None, resume=checkpoint is not None)
    if loaded:
        if sharding:
            args.device  # noqa: B018 - joins the process group (gloo on CPU): each rank loads only its rows
        with rank_local_loading() if sharding else contextlib.nullcontext():
            model, tokenizer = load_model(config.model.name, dtype=None if config.model.dtype == "auto" else
                                          config.model.dtype, quant=_quant_on_load(config),
                                          progress=config.train.progress)
    model = prepare_for_training(config, model, tokenizer)
    state_of(model).chat_template = train_set.chat_template  # recorded in every adapter folder saved
    model.config.use_cache = False
    if checkpoint is not None:
        _check_resume_base(model, checkpoint)
    if sharding:
        _shard_for_training(model, args)
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                               data_collator=PadCollator(tokenizer.pad_token_id))
    # A model sharded before the Trainer: it neither wraps it in DDP nor shards it again (its path for models
    # sharded at load time), while qbara's QbaraTrainer saves and resumes it.
    trainer.is_distributed_loading_by_transformers = is_sharded(model)
    trainer.qbara_keep = max(1, config.train.save_total_limit)
    try:
        with write_faults_as_errors(output_dir):  # disk full, file size limit: in a checkpoint or the final outputs
            _train_or_finish(trainer, model, checkpoint)
            history = trainer.state.log_history
            with full_adapter_parameters(model):  # gathers a sharded adapter; a no-op otherwise
                if trainer.is_world_process_zero():
                    _write_final_outputs(config, model, tokenizer, output_dir, history, foreign, lock)
    except KeyboardInterrupt:  # the lock's journal and the swap leave no partial adapter/
        raise TrainInterrupted(trainer.state.global_step, _last_checkpoint_step(output_dir)) from None
    adapter_dir = output_dir / "adapter"
    trainer.accelerator.wait_for_everyone()  # no rank leaves while rank 0 still writes
    losses = [h["loss"] for h in history if "loss" in h]
    layers = adapter_layers(model).values()
    folds = bool(layers) and all(layer.fold_problem() is None for layer in layers)
    return TrainResult(output_dir, adapter_dir, trainable_parameter_count(model), history,
                       losses[-1] if losses else None, folds)


def _shard_for_training(model, args) -> None:
    """train.fsdp: shard the packed base and the adapters over the ranks (FSDP2); an LQ / LoftQ base, saved whole
    next to the adapter, is refused."""
    if state_of(model).lq is not None:
        raise QbaraError("train.fsdp does not train an LQ-LoRA / LoftQ-initialised adapter (its base is saved "
                         "whole with the adapter); train it with DDP (leave train.fsdp empty)")
    args.device  # noqa: B018 - joins the process group (gloo on CPU) before sharding
    shard_model(model)
    local, total = local_packed_bytes(model)
    if os.environ.get("RANK", "0") == "0":
        print(f"qbara: FSDP full_shard over {os.environ.get('WORLD_SIZE')} ranks; rank 0 holds "
              f"{local / 2**20:.2f} of the {total / 2**20:.2f} MiB packed quantized base")


def _train_or_finish(trainer, model, checkpoint: Path | None) -> None:
    """Train (from `checkpoint` if given); a checkpoint at the run's last step is loaded instead."""
    if checkpoint is not None and _reached_the_end(trainer, checkpoint):
        print(f"qbara: {checkpoint.name} is at the run's last step; writing the final outputs from it")
        _load_adapter_weights(model, checkpoint)
        trainer.state = type(trainer.state).load_from_json(str(checkpoint / "trainer_state.json"))
        return
    bound_heap_growth()  # after loading: glibc would let each step's freed activations grow the heap (bench/scale.py)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused the checkpoint's state
        raise QbaraError(f"{checkpoint}: its optimizer, scheduler or RNG state is not plain tensors and numbers "
                         f"({' '.join(str(err).split())[:200]}); qbara loads no pickled objects: delete "
                         f"{checkpoint} to resume from an earlier checkpoint") from None


def _run_steps(trainer) -> int:
    """The number of optimizer steps the trainer's run takes (train.steps, or its epochs' worth), as HF's
    Trainer counts them."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    return epoch_steps(len(trainer.get_train_dataloader()), args.gradient_accumulation_steps, args.num_train_epochs)


def _reached_the_end(trainer, checkpoint: Path) -> bool:
    """Whether the checkpoint is at the run's last step (then nothing is left to train); a checkpoint past it
    is refused."""
    step = read_json_file(checkpoint / "trainer_state.json", "trainer_state.json")["global_step"]
    last = _run_steps(trainer)
    if step > last:
        raise QbaraError(f"{checkpoint} is at step {step}, past this run's {last} steps; resume with "
                         f"train.steps >= {step}, or train into a new train.output_dir")
    return step == last


def _write_final_outputs(config: RunConfig, model, tokenizer, output_dir: Path, history: list, foreign: set,
                         lock: OutputLock | None) -> None:
    """The final adapter (built beside `adapter/` and swapped in), the LoftQ / LQ base, the run config, the log
    and its plot, then the manifest; nothing if the adapter is not finite."""
    if lock is None:  # only the main rank (RANK 0), which holds the output's lock, writes them
        raise RuntimeError(f"the final outputs of {output_dir} are written by the process holding its lock")
    _check_finite_adapter(model)
    if state_of(model).lq is not None and not config.model.adapter:
        # LoftQ / LQ init: the adapter fits the decomposition's Q, which is saved next to it.
        base_name = str(save_quantized(model, tokenizer, output_dir / "base", base_only=True))
    else:
        base_name = base_model_path(config.model.name)
    users = {f.split("/", 1)[1] for f in foreign if f.startswith("adapter/")}  # the user's files in adapter/
    with lock.replace_folder(output_dir / "adapter", "train", foreign=users, mark=False) as tmp:
        save_adapter(model, tmp, base_model_name=base_name)
    write_json_atomic(output_dir / "run_config.json", config.to_dict())
    write_json_atomic(output_dir / "log_history.json", history)
    _plot_loss_curve(history, output_dir / "loss_curve.png", title=_run_title(model, config.model.name))
    mark_folder(output_dir, "train", foreign)


def _run_title(model, model_name: str) -> str:
    """What a reader of the loss plot needs: method and rank, base model, quant, e.g. 'qahira r4 on tiny-llama
    (int4-g32)'; the quant is read from the adapted layers (several formats for LQ-LoRA)."""
    adapter = state_of(model).adapter_config
    labels = sorted({layer.quant_config.label if layer.quant_config is not None else "not quantized"
                     for layer in adapter_layers(model).values()})
    quant = labels[0] if len(labels) == 1 else (", ".join(labels) if len(labels) <= 3 else f"{len(labels)} formats")
    method = f"{adapter.method} r{adapter.rank}" if adapter is not None else "adapters"
    return f"{method} on {Path(str(model_name)).name} ({quant})"


def _plot_loss_curve(history: list, path, title: str | None = None) -> Path | None:
    """Training (and eval) loss against step, as a PNG, under `title` (see `run_title`); the eval curve starts
    with the step-0 evaluation when the run made one."""
    train_points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_points = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train_points and not eval_points:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 4))
    if train_points:
        ax.plot(*zip(*train_points), label="train loss")
    if eval_points:
        ax.plot(*zip(*eval_points), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
