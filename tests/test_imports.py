"""The package's modules form no import cycle, counting imports inside functions: lower layers
never import higher ones (a function-level import that dodges a cycle means the layout is wrong)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "glowflow"


def module_graph(package_dir: Path) -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports, anywhere in its file."""
    root = package_dir.name
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        files[name] = (path, is_package)

    def resolve(base: str, attr: str | None) -> str | None:
        if attr and f"{base}.{attr}" in files:
            return f"{base}.{attr}"
        return base if base in files else None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in files.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not (base == root or base.startswith(root + ".")):
                    continue
                for alias in node.names:
                    target = resolve(base, alias.name)
                    if target is not None:
                        edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_glowflow_has_no_import_cycles():
    graph = module_graph(PACKAGE_DIR)
    assert len(graph) > 20 and "glowflow.cli.common" in graph["glowflow.cli.train"]
    assert find_cycles(graph) == []


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import f\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n    return g\n")
    (pkg / "top.py").write_text("from .sub import f\n\ndef g():\n    return 1\n")
    (pkg / "alone.py").write_text("import os\nfrom . import top\n")
    graph = module_graph(pkg)
    assert graph["pkg.sub.leaf"] == {"pkg.top"} and graph["pkg.alone"] == {"pkg.top"}
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.top"]]


def test_no_layer_module_imports_the_fast_paths():
    """The layers are plain PyTorch: the fast paths call them, never the reverse."""
    graph = module_graph(PACKAGE_DIR)
    layer_modules = ["glowflow.layers", "glowflow.couplings", "glowflow.networks", "glowflow.splines",
                     "glowflow.mixture", "glowflow.blocks", "glowflow.memory", "glowflow.dequantization"]

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            v = todo.pop()
            if v == target:
                return True
            if v not in seen:
                seen.add(v)
                todo.extend(graph.get(v, ()))
        return False

    assert "glowflow.fast" in graph["glowflow.model"]  # the check can see the edge it looks for
    assert [m for m in layer_modules if reaches(m, "glowflow.fast")] == []
