"""lm-evaluation-harness on an in-memory qbara model: local tasks, offline errors in one line, JSON results."""
from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qbara.atomic import write_json_atomic
from qbara.errors import QbaraError
from qbara.eval.bundled import TASKS_DIR

LM_EVAL_OPTIONS = ("limit", "num_fewshot", "batch_size", "include_path", "output_path")
_LM_EVAL_INSTALL = "--task lm-eval needs lm-evaluation-harness: pip install lm-eval"
TASKS_HINT = ("list lm-eval's tasks with `lm-eval ls tasks` (add `--include_path DIR` for your own), or write a "
              "task YAML in a folder and pass --include-path FOLDER")


def check_output_path(path) -> Path | None:
    """The --output-path file, refused when it (or a parent) is not where a file can be written."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        raise QbaraError(f"--output-path {str(path)!r} is a folder; give a file name such as "
                         f"{str(path / 'results.json')!r}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QbaraError(f"--output-path {str(path)!r}: {str(parent)!r} is a file, not a folder")
            break
    return path


def _task_manager_class():
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise QbaraError(_LM_EVAL_INSTALL) from None
    return TaskManager


def _hub_unreachable(err: BaseException) -> bool:
    """True when `err` or its causes say the Hub could not be reached (offline mode, no network, not cached)."""
    kinds: list[type] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled, datasets' "Couldn't reach"
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError

        kinds.append(LocalEntryNotFoundError)
    except ImportError:
        pass
    for module in ("httpx", "httpx2", "requests"):  # the HTTP clients huggingface_hub / datasets use
        mod = sys.modules.get(module)  # (one that was never imported raised nothing)
        if mod is not None:
            kinds += [getattr(mod, n) for n in ("ConnectError", "TimeoutException", "ConnectionError", "Timeout")
                      if isinstance(getattr(mod, n, None), type)]
    offline = _hub_offline()
    try:
        from datasets.exceptions import DatasetNotFoundError
    except ImportError:
        DatasetNotFoundError = None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, tuple(kinds)):
            return True
        if offline and DatasetNotFoundError is not None and isinstance(err, DatasetNotFoundError):
            return True
        err = err.__cause__ or err.__context__
    return False


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _task_error(name: str, err: Exception) -> QbaraError | None:
    """A one-line QbaraError for a task whose dataset or metric could not load; None for other failures (bugs)."""
    if _hub_unreachable(err):
        return QbaraError(f"task {name} needs the Hub (offline here); point --include-path at a folder with a "
                          f"local task YAML whose dataset is local")
    try:
        from datasets.exceptions import FileNotFoundDatasetsError
    except ImportError:
        return None
    # also a FileNotFoundError `datasets` raised for a local data_files pattern that matches nothing
    if isinstance(err, FileNotFoundDatasetsError) or (isinstance(err, FileNotFoundError)
                                                       and _raised_in(err, "datasets")):
        message = " ".join(str(err).split())
        return QbaraError(f"task {name}: its dataset could not be found ({message}); check dataset_path and "
                          f"dataset_kwargs.data_files in its task YAML")
    return None


def _raised_in(err: BaseException, package: str) -> bool:
    """True when the innermost frame of `err`'s traceback is in `package`."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module == package or module.startswith(package + ".")


@dataclass
class _LmEvalTasks:
    """Tasks loaded by `load_lm_eval_tasks`: what simple_evaluate runs, and the TaskManager that knows them."""

    names: list[str]
    objects: list = field(default_factory=list)   # Task / Group objects (TaskManager.load), else names
    task_manager: object = None


def _task_manager(TaskManager, include_path: list[Path], names: list[str]):
    """A TaskManager for `names`; lm-eval's own task YAMLs are not indexed (slow) when the local ones suffice."""
    if include_path:
        try:
            local = TaskManager(include_path=[str(p) for p in include_path], include_defaults=False)
        except TypeError:  # an lm-eval without include_defaults
            local = None
        if local is not None and all(n in getattr(local, "all_subtasks", ()) for n in names):
            return local
    return TaskManager(include_path=[str(p) for p in include_path] or None)


def _expand(task_manager, name: str) -> list[str]:
    """`name` itself when lm-eval knows it (a task, group, tag, or a YAML file); the matches of a glob pattern."""
    if name in task_manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
        return [name]
    if any(c in name for c in "*?["):
        matches = task_manager.match_tasks([name])
        if matches:
            return list(matches)
    close = difflib.get_close_matches(name, task_manager.all_tasks, n=3)
    maybe = f"did you mean {', '.join(close)}? " if close else ""
    raise QbaraError(f"unknown lm-eval task {name!r}: {maybe}{TASKS_HINT}")


def load_lm_eval_tasks(tasks: str, include_path=None) -> _LmEvalTasks:
    """Resolve comma-separated task names (globs allowed) and load them with their datasets; include_path: folder(s)
    of task YAMLs besides lm-eval's and qbara's bundled ones. Unknown or Hub-only tasks raise one QbaraError."""
    TaskManager = _task_manager_class()
    if include_path is None:
        folders = []
    elif isinstance(include_path, (str, Path)):
        folders = [Path(include_path).expanduser()]
    else:
        folders = [Path(p).expanduser() for p in include_path]
    for folder in folders:
        if not folder.is_dir():
            raise QbaraError(f"--include-path {str(folder)!r} is not a folder; give a folder holding task YAML files")

    folders.append(TASKS_DIR)  # qbara's bundled offline tasks (qbara_shakespeare_next_line), always found
    requested = [t.strip() for t in str(tasks).split(",") if t.strip()]
    if not requested:
        raise QbaraError(f"--task lm-eval needs task names in --data (comma-separated); {TASKS_HINT}")
    manager = _task_manager(TaskManager, folders, requested)
    names = list(dict.fromkeys(n for r in requested for n in _expand(manager, r)))
    out = _LmEvalTasks(names=names, task_manager=manager)
    if not hasattr(manager, "load"):  # older lm-eval: simple_evaluate loads the tasks by name
        out.objects = list(names)
        return out
    out.objects = _load_tasks(manager, names)
    return out


def _load_tasks(manager, names: list[str]) -> list:
    """The Task / Group objects for `names`, one name at a time so that an error names its task."""
    objects = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as err:
            mapped = _task_error(name, err)
            if mapped is None:
                raise
            raise mapped from err
        groups, group_map = loaded.get("groups") or {}, loaded.get("group_map") or {}
        children = {str(c) for kids in group_map.values() for c in kids}
        if groups:  # a group: pass it whole (its subtasks are in it) so its aggregate score is computed
            objects += [g for key, g in groups.items() if key not in children]
        else:  # a task, or a tag (its tasks)
            objects += list(loaded["tasks"].values())
    return objects


def jsonable(value):
    """lm-eval's results as plain JSON data: scalars as numbers, NaN / inf as null, other objects as str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():  # numpy / torch scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def lm_eval_bridge(model, tokenizer, tasks, *, limit: int | float | None = None, num_fewshot: int | None = None,
                   batch_size: int | str = 1, include_path=None, output_path=None,
                   provenance: dict | None = None) -> dict:
    """Run lm-evaluation-harness tasks on the in-memory model; limit: examples per task (int) or a fraction
    (float below 1). Returns {"results", "groups", "n-shot", "versions", "limit", "output_path"} as JSON data."""
    if not isinstance(tasks, _LmEvalTasks):
        tasks = load_lm_eval_tasks(tasks, include_path)
    output_path = check_output_path(output_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        raw = simple_evaluate(model=lm, tasks=tasks.objects, task_manager=tasks.task_manager, limit=limit,
                              num_fewshot=num_fewshot, batch_size=batch_size, log_samples=False)
    except Exception as err:
        mapped = _task_error(",".join(tasks.names), err)
        if mapped is None:
            raise
        raise mapped from err
    raw = jsonable({k: v for k, v in (raw or {}).items() if k != "samples"})
    if provenance:
        raw["qbara"] = jsonable({**provenance, "tasks": tasks.names})
    if output_path is not None:
        write_json_atomic(output_path, raw)
    out = {"results": raw.get("results", {})}
    for key in ("groups", "n-shot", "versions"):
        if raw.get(key):
            out[key] = raw[key]
    out["limit"] = limit
    out["output_path"] = str(output_path) if output_path is not None else None
    return out


def parse_limit(text: str) -> int | float:
    """--limit: a whole number of examples per task, or a fraction (0 < f < 1) of each task."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give examples per task (e.g. 100) "
                                         f"or a fraction below 1 (e.g. 0.1)") from None
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of examples per task (e.g. 100) or a "
                                     f"fraction between 0 and 1 (e.g. 0.1)")


def count_type(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}")
        return value
    return parse


def parse_batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    return count_type(1)(text)
