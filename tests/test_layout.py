"""The project's shape: one import name, imports in one direction, no cycles.

The import graph is read with ast from the source (server/ -> recserve,
kernels/ -> recserve.kernels, clients/ -> recserve.clients): every import of a
project module, at module level or inside a function, but not those under
`if TYPE_CHECKING:` (never run). `from package import sub` counts as an edge to
the submodule. A package's own __init__, which Python runs before any of its
submodules, is not counted as an import of each submodule's (as importlab and
pydeps also do), so packages may re-export their submodules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"server": "recserve", "kernels": "recserve.kernels", "clients": "recserve.clients"}


def modules() -> dict[str, Path]:
    """Module name -> source file (.py, or .pyx for a kernel), generated stubs aside."""
    out = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".pyx") or "v1" in path.relative_to(ROOT).parts:
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((name, *parts))] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (at run time)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    if path.suffix == ".pyx":  # Cython: read the Python-level imports and cimports
        found = set()
        for m in re.finditer(
            r"^\s*(?:from\s+(\.*[\w.]*)\s+c?import\s+([\w, ]+)|c?import\s+([\w.]+))",
            path.read_text(),
            re.M,
        ):
            base, names, plain = m.groups()
            if plain:
                found.add(plain)
                continue
            if base.startswith("."):
                base = package + ("." + base.lstrip(".") if base.strip(".") else "")
            found |= {f"{base}.{n.strip()}" for n in names.split(",")} | {base}
        return {_resolve(f, known) for f in found} - {None, name}
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([base] if base else [])])
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in known else base)
    return {_resolve(f, known) for f in found} - {None, name}


def _resolve(dotted: str, known: set[str]) -> str | None:
    """The longest known module that `dotted` names or lies inside."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), plus
    modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in g.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    g = graph()
    assert len(g) > 30
    assert "recserve.serving" in g["recserve.service.core"]
    assert "recserve.serving.catalog" in g["recserve.serving.router"]
    assert "recserve.kernels.topk" in g["recserve.models.base"]
    assert "recserve.kernels.topk" in g["recserve.kernels.similarity"]  # a relative cimport


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_go_one_way():
    """Lower layers never import higher ones (the architecture's direction)."""
    g = graph()
    layers = [
        ("recserve.kernels", {"recserve.kernels"}),
        (
            "recserve.models",
            {
                "recserve.kernels",
                "recserve.models",
                "recserve.data",
                "recserve.index",
                "recserve.config",
                "recserve.lazy",
                "recserve.metrics",
            },
        ),
        (
            "recserve.serving",
            {
                "recserve.kernels",
                "recserve.models",
                "recserve.data",
                "recserve.serving",
                "recserve.config",
                "recserve.contract",
                "recserve.feedback",
                "recserve.metrics",
            },
        ),
        ("recserve.clients", {"recserve.clients", "recserve.contract"}),
        ("recserve.config", set()),
        ("recserve.metrics", set()),
        ("recserve.contract", set()),
    ]
    for prefix, allowed in layers:
        for name, deps in g.items():
            if name == prefix or name.startswith(prefix + "."):
                deps = deps - {"recserve"}  # the root package: only __version__
                bad = {d for d in deps if not any(d == a or d.startswith(a + ".") for a in allowed)}
                assert not bad, f"{name} imports {sorted(bad)}"


def test_the_core_knows_no_grpc():
    for name in ("core", "convert", "auth"):
        tree = ast.parse((ROOT / "server" / "service" / f"{name}.py").read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("grpc", "grpc_health")], name


def test_no_module_imports_another_modules_private_names():
    for name, path in modules().items():
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recserve"):
                private = [
                    a.name
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
                assert not private, f"{name} imports {private} from {node.module}"
