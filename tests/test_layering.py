"""Imports flow one way: base utilities -> quant -> nn -> targets -> adapters / lq / native -> models -> preparation /
pretrained -> eval / export / train / generation -> commands. Every import, at module level or inside a function, is
checked: the upward imports that remain are listed in UPWARD, the edges of the import cycles that remain in
KNOWN_CYCLES; both may only shrink."""
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

# Imports that close a cycle, still to remove (importer -> imported): the graph without them has none.
KNOWN_CYCLES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    """A file's module; a package's __init__.py is the package."""
    parts = ("qbara",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def level(module: str) -> int:
    parts = module.split(".")
    return LEVEL[parts[1] if len(parts) > 1 else "qbara"]


def qbara_imports(path: Path) -> set[str]:
    """The qbara modules `path` imports anywhere in it: `from package import submodule` is the submodule, any other
    `from x import name` the module x (a package: its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("qbara"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qbara"))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the qbara modules it imports (itself left out)."""
    return {module: qbara_imports(path) - {module} for module, path in MODULES.items()}


def upward_imports() -> set[tuple[str, str]]:
    return {(importer, imported) for importer, imports in import_graph().items() for imported in imports
            if level(imported) > level(importer)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in graph.get(node, ()):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _without(graph: dict[str, set[str]], edges: set[tuple[str, str]]) -> dict[str, set[str]]:
    return {module: {m for m in imports if (module, m) not in edges} for module, imports in graph.items()}


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


def test_no_import_cycle_between_modules():
    """No module of src/qbara reaches itself through imports, at module level or inside functions."""
    found = cycles(_without(import_graph(), KNOWN_CYCLES))
    assert not found, f"import cycles (modules that import each other, directly or around a loop): {found}"


def test_the_list_of_remaining_cycle_imports_is_current():
    graph = import_graph()
    gone = {(importer, imported) for importer, imported in KNOWN_CYCLES if imported not in graph.get(importer, ())}
    assert not gone, f"remove these from KNOWN_CYCLES, they no longer exist: {sorted(gone)}"


def test_no_import_cycle_between_the_parts_of_a_layer():
    """Within a layer the parts (adapters, lq, native; the base utilities) are ordered too: no two import each
    other, through any of their modules."""
    graph = _without(import_graph(), KNOWN_CYCLES)
    for names in LAYERS:
        parts = {name: set() for name in names}
        for importer, imports in graph.items():
            part = importer.split(".")[1] if "." in importer else "qbara"
            if part not in parts:
                continue
            for imported in imports:
                other = imported.split(".")[1] if "." in imported else "qbara"
                if other in parts and other != part:
                    parts[part].add(other)
        found = cycles(parts)
        assert not found, f"parts of the layer {names} that import each other: {found}"


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
