"""The packages' imports point one way and never form a circle (docs/conventions.md, "Layout shows the architecture").

Every module of vitslim and vitslim_kernels is read with ast (nothing is imported). Checked:
- no circle among the modules (imports at any depth, a function's included);
- no import against the layer order: entry points -> cli -> engine/data/deploy/reporting -> model layer ->
  model families -> layers -> the family seam -> core records -> vitslim_kernels; inside vitslim_kernels:
  tools -> ops -> backends -> runtime;
- an import inside a function only for an optional dependency (triton, the extension, onnx, DALI,
  matplotlib, or our modules that need them), with a comment on its line saying so.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vitslim", "vitslim_kernels")

# Layer of each module, by longest matching prefix: an import may only go to a lower layer, or to its own.
LAYERS = {
    # vitslim: entry points (python -m ...) on top, then the command line, the tools, the model layer, ...
    "vitslim.search": 9, "vitslim.retrain": 9, "vitslim.export": 9, "vitslim.plan.__main__": 9,
    "vitslim.cli": 8,
    "vitslim.engine": 7, "vitslim.data": 7, "vitslim.deploy": 7, "vitslim.reporting": 7,
    "vitslim": 6,  # the public API (vitslim/__init__.py) and the model layer: searchable, slim, threshold, ...
    "vitslim.families": 5.5,  # the registry of model families, then each family, then the seam they implement
    "vitslim.families.vit": 5.2, "vitslim.families.swin": 5.2,
    "vitslim.gates": 5, "vitslim.layers": 5, "vitslim.cuda_graphs": 5, "vitslim.digits": 5,
    "vitslim.families.base": 4.5,
    "vitslim.errors": 4, "vitslim.files": 4, "vitslim.distributed": 4, "vitslim.plan": 4,
    "vitslim.implementations": 4,
    # vitslim_kernels: tools -> the package's functionals -> ops -> backends -> runtime
    "vitslim_kernels.info": 3.5, "vitslim_kernels.selftest": 3.5, "vitslim_kernels.compile_only": 3.5,
    "vitslim_kernels.onnx": 3.5,
    "vitslim_kernels": 3.2,  # vitslim_kernels/__init__.py: the public functionals
    "vitslim_kernels.ops": 3,
    "vitslim_kernels.triton": 2, "vitslim_kernels.cuda": 2, "vitslim_kernels._ext": 2,
    "vitslim_kernels.dispatch": 1, "vitslim_kernels.runtime": 1,
}
# Imported inside a function, lazily: optional dependencies, and our modules that import one at their top.
OPTIONAL = ("triton", "onnx", "onnxruntime", "onnxscript", "nvidia.dali", "matplotlib", "vitslim_kernels._C",
            "vitslim_kernels._ext", "vitslim_kernels.triton", "vitslim_kernels.cuda", "vitslim_kernels.onnx")

# Imports of vitslim_kernels that run against its layering today: what issue 23's first part (ops own their op,
# dispatch is mechanism only, backends import no op) removes. Exact: the test fails on any new one, and on one
# of these once it is gone (delete it here then), so this list only shrinks.
KNOWN_KERNEL_VIOLATIONS: frozenset[str] = frozenset()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str, node: ast.ImportFrom | ast.Import, alias: ast.alias, modules: dict) -> str | None:
    """The project module an import names (a submodule if `from pkg import sub` names one), or None."""
    if isinstance(node, ast.Import):
        target = alias.name
    else:
        package = name.split(".") if modules[name].name == "__init__.py" else name.split(".")[:-1]
        base = package[: len(package) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        if f"{target}.{alias.name}" in modules:
            return f"{target}.{alias.name}"
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> tuple[ast.Module, list[str], frozenset[int]]:
    """(the module's tree, its lines, the ids of its import nodes that sit inside a function), read once."""
    source = path.read_text()
    tree = ast.parse(source)
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return tree, source.splitlines(), frozenset(in_function)


def _imports(modules: dict) -> list[tuple[str, str | None, str, bool, int, str]]:
    """(importer, project module or None, the imported name as written, inside a function, line, line text)."""
    found = []
    for name, path in modules.items():
        tree, lines, in_function = _parsed(path)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            written = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                ("." * node.level) + (node.module or "") for _ in node.names]
            for alias, text in zip(node.names, written):
                target = _resolve(name, node, alias, modules)
                found.append((name, target, text, id(node) in in_function, node.lineno, lines[node.lineno - 1]))
    return found


def _layer(module: str) -> float:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no layer in tests/test_imports.py LAYERS: give it one")


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def check(modules: dict[str, Path]) -> list[str]:
    """Every finding, one line each."""
    problems = []
    edges: dict[str, set[str]] = {}
    for importer, target, written, lazy, line, text in _imports(modules):
        where = f"{modules[importer].relative_to(ROOT)}:{line}"
        if lazy:
            optional = any(written == o or written.startswith(o + ".") for o in OPTIONAL) or (
                target is not None and any(target == o or target.startswith(o + ".") for o in OPTIONAL))
            if not optional:
                problems.append(f"{where}: import of {written} inside a function (only optional dependencies "
                                f"may be imported lazily: {', '.join(OPTIONAL)})")
            elif "#" not in text and "#" not in _parsed(modules[importer])[1][line - 2]:
                problems.append(f"{where}: the lazy import of {written} says nowhere why (a comment on its line)")
        if target is None or target == importer:
            continue
        edges.setdefault(importer, set()).add(target)
        importer_package, target_package = importer.split(".")[0], target.split(".")[0]
        if importer_package == "vitslim_kernels" and target_package == "vitslim":
            problems.append(f"{where}: vitslim_kernels imports {target}: the kernels know nothing of vitslim")
        elif importer_package == target_package and _layer(target) > _layer(importer):
            message = f"{where}: {importer} imports {target}, a higher layer"
            if importer_package == "vitslim_kernels":
                message = f"kernel layering: {importer} -> {target}"
            problems.append(message)
    for circle in _circles(edges):
        problems.append(f"import circle: {' <-> '.join(circle)}")
    return problems


def test_imports_point_one_way_and_form_no_circle():
    problems = check(_modules())
    known = sorted(p for p in problems if p in KNOWN_KERNEL_VIOLATIONS)
    new = sorted(p for p in problems if p not in KNOWN_KERNEL_VIOLATIONS)
    assert not new, "\n".join(new)
    gone = sorted(KNOWN_KERNEL_VIOLATIONS - set(known))
    assert not gone, "fixed (remove from KNOWN_KERNEL_VIOLATIONS):\n" + "\n".join(gone)


@pytest.mark.parametrize("mutation", ["circle", "upward", "lazy"])
def test_the_check_finds_a_circle_an_upward_import_and_a_lazy_one(tmp_path, monkeypatch, mutation):
    """The checker on a copy of the tree with one import added: each kind of violation is reported."""
    modules = _modules()
    edits = {
        "circle": ("vitslim.errors", "from .plan import SlimPlan  # noqa\n", "import circle"),  # plan imports errors
        "upward": ("vitslim.plan", "from ..cli import common  # noqa\n", "a higher layer"),
        "lazy": ("vitslim.files", "def _f():\n    from .plan import SlimPlan  # noqa\n", "inside a function"),
    }
    name, line, expected = edits[mutation]
    copy = tmp_path / modules[name].relative_to(ROOT)
    copy.parent.mkdir(parents=True)
    copy.write_text(modules[name].read_text() + "\n" + line)
    modules[name] = copy
    monkeypatch.setattr(Path, "relative_to", lambda self, other: Path(str(self).removeprefix(str(other) + "/"))
                        if str(self).startswith(str(other)) else Path(self.name))
    problems = check(modules)
    assert any(expected in p for p in problems), problems
