"""Imports flow one way: base utilities -> quant -> nn -> targets -> adapters / lq / native -> models -> preparation /
pretrained -> eval / export / train / generation -> commands. Every import, at module level or inside a function, is checked; the upward imports
that remain are listed in UPWARD and may only shrink."""
import ast
from pathlib import Path

import qbara

PACKAGE = Path(qbara.__file__).parent
LAYERS = (
    ("errors", "options", "atomic", "memory", "tensor_checks", "validate", "lazy_tensors", "plotting", "distributed",
     "outputs", "fingerprint", "state", "data", "templates", "prompt_formats"),
    ("quant",),
    ("nn",),
    ("targets",),
    ("adapters", "lq", "native"),
    ("models",),
    ("preparation", "pretrained"),
    ("eval", "export", "train", "generation"),
    ("commands", "cli", "__main__", "qbara"),
)
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}

# Upward imports still to remove (importer -> imported). Remove an entry when its import goes.
UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = ("qbara",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(module: str) -> int:
    parts = module.split(".")
    return LEVEL[parts[1] if len(parts) > 1 else "qbara"]


def qbara_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("qbara"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qbara"))
    return found


def upward_imports() -> set[tuple[str, str]]:
    upward = set()
    for path in PACKAGE.rglob("*.py"):
        importer = module_name(path)
        upward.update((importer, imported) for imported in qbara_imports(path) if level(imported) > level(importer))
    return upward


def test_every_module_has_a_layer_and_imports_absolutely():
    for path in PACKAGE.rglob("*.py"):
        level(module_name(path))  # KeyError names a module outside LAYERS
        relative = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, f"{path}: relative imports on lines {relative} escape the layering check"


def test_no_new_upward_import():
    new = upward_imports() - UPWARD
    assert not new, f"upward imports (a lower layer importing a higher one): {sorted(new)}"


def test_the_list_of_remaining_upward_imports_is_current():
    gone = UPWARD - upward_imports()
    assert not gone, f"remove these from UPWARD, they no longer exist: {sorted(gone)}"
