"""The README and the manual in docs/ say only what the code does.

- Every ```python block of README.md and docs/python-api.md runs, in order, one namespace per page, in a fresh
  folder, with `tiny-llama` (random weights, seconds) in place of the embedded `smollm2-135m`.
- A block after `<!-- snippet: names-only (why) -->` (a 7B checkpoint, minutes of error tables) and every python
  block of the other pages is checked for names: each `import` / `from ... import` and each `qbara.a.b` chain
  resolves the way Python would resolve it (so `qbara.prepare.dequantize_model`, an attribute of the function
  `qbara.prepare`, fails).
- Every `qbara.a.b` named in the prose resolves the same way; every YAML run config builds; every relative link
  points at a file, and every `#anchor` at a heading of it.
"""
from __future__ import annotations

import ast
import importlib
import re
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = [ROOT / "README.md", ROOT / "docs" / "python-api.md"]
# Written by a generator, not by hand (the config-key reference): a link to it may precede the file in a branch.
GENERATED = {ROOT / "docs" / "config.md"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NAMES_ONLY = "<!-- snippet: names-only"


def blocks(page: Path, language: str) -> list[tuple[str, bool]]:
    """(code, names_only) for each fenced block of `language` on `page`."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) == language:
            before = text[:match.start()].rstrip().rsplit("\n", 1)[-1]
            found.append((match.group(2), before.startswith(NAMES_ONLY)))
    return found


def resolve(chain: str) -> None:
    """`qbara.a.b` as Python evaluates it after `import qbara`: attribute by attribute; a submodule that is not
    yet an attribute of its package may be imported (as `import qbara.a` would), an attribute of anything else
    may not."""
    parts = chain.split(".")
    obj = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], start=1):
        if hasattr(obj, name):
            obj = getattr(obj, name)
        elif isinstance(obj, types.ModuleType):
            obj = importlib.import_module(".".join(parts[: i + 1]))
        else:
            raise AssertionError(f"{chain}: {'.'.join(parts[:i])} is a {type(obj).__name__}, it has no {name!r}")


def qbara_chains(tree: ast.AST) -> set[str]:
    """Every attribute chain rooted at the name `qbara` (longest only) and every module imported; each name
    imported with `from qbara... import` is checked on the spot."""
    chains = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qbara":
            for alias in node.names:  # `from M import X` reads X from the module M, whatever the package holds
                assert hasattr(importlib.import_module(node.module), alias.name), f"from {node.module} import {alias.name}"
        elif isinstance(node, ast.Import):
            chains |= {alias.name for alias in node.names if alias.name.split(".")[0] == "qbara"}
        elif isinstance(node, ast.Attribute):
            parts, inner = [], node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "qbara":
                chains.add(".".join(["qbara", *reversed(parts)]))
    return {c for c in chains if not any(o != c and o.startswith(c + ".") for o in chains)}


def test_every_page_has_python_or_is_prose_and_the_runnable_pages_have_blocks():
    for page in RUN:
        assert blocks(page, "python"), f"{page.name} has no python block to run"


@pytest.mark.parametrize("page", RUN, ids=lambda p: p.name)
def test_python_blocks_run_on_the_tiny_model(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QBARA_CACHE", str(tmp_path / "cache"))
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for number, (code, names_only) in enumerate(blocks(page, "python"), start=1):
        if names_only:
            continue
        code = code.replace('"smollm2-135m"', '"tiny-llama"')
        try:
            exec(compile(code, f"{page.name} python block {number}", "exec"), namespace)
        except Exception as err:  # the page's reader would see the same failure
            raise AssertionError(f"{page.name} python block {number} failed: {err!r}\n{code}") from err
        ran += 1
    assert ran >= 1
    if page.name == "README.md":
        assert (tmp_path / "out" / "adapter" / "qbara_adapter.json").is_file()
        assert namespace["model"].qbara.fold_rounding is not None  # merged into the quantized model


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_qbara_name_in_code_and_prose_resolves(page):
    checked = set()
    for code, _ in blocks(page, "python"):
        checked |= qbara_chains(ast.parse(code))
    prose = FENCE.sub("", page.read_text())
    for span in re.findall(r"`([^`\n]+)`", prose):
        checked |= {c for c in re.findall(r"(?<![\w./])qbara(?:\.[A-Za-z_]\w*)+", span) if not c.endswith(".py")}
    for chain in sorted(checked):
        resolve(chain)


def test_the_known_stale_spelling_is_caught():
    resolve("qbara.prepare")
    resolve("qbara.lq.factors.FACTOR_CONFIG")
    with pytest.raises(AssertionError, match="is a function"):
        resolve("qbara.prepare.dequantize_model")


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "yaml")], ids=lambda p: p.name)
def test_yaml_run_configs_build(page):
    from qbara.train.config import build_config

    for code, _ in blocks(page, "yaml"):
        config = build_config(yaml.safe_load(code))
        assert config.model.name and config.train.output_dir


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if file in GENERATED and not file.exists():
            continue
        assert file.exists(), f"{page.name}: link to {target} points at nothing"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: no heading #{anchor} in {file.name}"
