"""The code-shape figures the project tracks, from a static reading of src/igpt: README lines, modules at the
top of the package, the largest modules and longest functions, the modules that name an objective, private
names imported across modules (src, tests, benchmarks), and the import graph's cycles and upward imports.
Run from the project root: `python3 scripts/code_metrics.py`. tests/test_api.py checks the layering with the
same functions."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PKG = Path("src/igpt")
LAYERS = ("data", "model", "training", "probes", "finetuning", "generation", "serving", "pipeline")
"""The subpackages from the bottom up: each imports only those below it (and the top-level modules)."""
BASE = ("errors", "settings", "checks", "files", "hardware", "results")
"""Top-level modules every layer may import; they import no subpackage."""
OBJECTIVE_NAME = re.compile(r"""["'](ar|bert)["']""")


def module_name(path: Path, root: Path = PKG) -> str:
    """igpt.data.sources for src/igpt/data/sources.py (a package's __init__ is the package)."""
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules(root: Path = PKG) -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, list[str]]:
    """The igpt modules `name` imports (at the top or inside functions), each with the names it takes."""
    out: dict[str, list[str]] = {}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("igpt"):
                target = node.module
            else:
                continue
            for a in node.names:
                if f"{target}.{a.name}" in known:  # `from igpt.data import sources`
                    out.setdefault(f"{target}.{a.name}", [])
                elif target in known:
                    out.setdefault(target, []).append(a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    out.setdefault(a.name, [])
    out.pop(name, None)
    return out


def layer(name: str) -> str:
    """The subpackage a module belongs to, or its own name at the top (igpt.runs -> runs)."""
    return name.split(".")[1] if name.count(".") >= 1 else name


def upward_imports(known: dict[str, Path]) -> list[str]:
    """Imports that point up: a subpackage importing a later one in LAYERS (or the CLI), a base module
    importing any subpackage, anything but __main__ importing the CLI."""
    bad = []
    for name, path in known.items():
        here = layer(name)
        for target in imports(name, path, known):
            there = layer(target)
            if there == here:
                continue
            if there == "cli" and name != "igpt.__main__":
                bad.append(f"{name} -> {target} (only __main__ may import the CLI)")
            elif here in LAYERS and there in LAYERS and LAYERS.index(there) > LAYERS.index(here):
                bad.append(f"{name} -> {target}")
            elif here in BASE and there in LAYERS:
                bad.append(f"{name} -> {target} (a base module importing a subpackage)")
    return bad


def cycles(known: dict[str, Path]) -> list[list[str]]:
    """Import cycles between modules (lazy imports counted), each as its modules."""
    graph = {n: set(imports(n, p, known)) - {"igpt"} for n, p in known.items()}
    graph = {n: {d for d in ds if not known[d].name == "__init__.py"} for n, ds in graph.items()}
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                found.append([*path[path.index(d) :], m, d] if d in path else [m, d])
            elif d not in state:
                visit(d, [*path, m])
        state[m] = 2

    sys.setrecursionlimit(10_000)
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def private_imports(
    known: dict[str, Path], extra_dirs: tuple[str, ...] = ("tests", "benchmarks")
) -> list[str]:
    """`from X import _name` across modules: in src (another igpt module's private name, or a private
    module of another library), and in tests and benchmarks (any igpt private name)."""
    found = []
    files = {n: p for n, p in known.items()}
    for d in extra_dirs:
        files.update({str(p): p for p in sorted(Path(d).rglob("*.py"))})
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                private_mod = any(
                    part.startswith("_") and not part.startswith("__") for part in mod.split(".")
                )
                for a in node.names:
                    if (
                        a.name.startswith("_")
                        and not a.name.startswith("__")
                        and (node.level or "igpt" in mod)
                    ):
                        found.append(f"{name}: from {'.' * node.level}{mod} import {a.name}")
                    elif private_mod and not mod.startswith("igpt") and not node.level:
                        found.append(f"{name}: from {mod} import {a.name}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if (
                    node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and node.value.id
                    in (
                        "pipeline",
                        "finetuning",
                        "sources",
                        "quickstart",
                        "finetune",
                    )
                ):
                    found.append(f"{name}: {node.value.id}.{node.attr}")
    return found


def functions(tree: ast.AST):
    """Every function and method with its qualified name."""

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def main() -> None:
    known = modules()
    sizes, funcs, classes = [], [], []
    naming = []
    for name, p in known.items():
        text = p.read_text()
        tree = ast.parse(text)
        sizes.append((len(text.splitlines()), name))
        funcs += [(f.end_lineno - f.lineno + 1, f"{name}.{q}") for q, f in functions(tree)]
        classes += [
            (c.end_lineno - c.lineno + 1, f"{name}.{c.name}")
            for c in tree.body
            if isinstance(c, ast.ClassDef)
        ]
        if OBJECTIVE_NAME.search(text) and name not in ("igpt.model.objectives",):
            naming.append(name)
    top = [n for n, p in known.items() if n.count(".") == 1 and p.name != "__init__.py"]
    print("README lines:", len(Path("README.md").read_text().splitlines()))
    print(f"modules at the top of src/igpt: {len(top)} ({', '.join(sorted(n.split('.')[1] for n in top))})")
    print("subpackages:", ", ".join(sorted({n.split(".")[1] for n in known if n.count(".") == 2})))
    print("largest modules (lines):", ", ".join(f"{n} {s}" for s, n in sorted(sizes, reverse=True)[:6]))
    print("modules over 450 lines:", sum(s > 450 for s, _ in sizes))
    print("longest functions (lines):", ", ".join(f"{n} {s}" for s, n in sorted(funcs, reverse=True)[:6]))
    print("functions over 60 lines:", sum(s > 60 for s, _ in funcs))
    print("largest classes (lines):", ", ".join(f"{n} {s}" for s, n in sorted(classes, reverse=True)[:3]))
    print("modules naming an objective ('ar'/'bert' literals) besides model.objectives:", naming or "none")
    priv = private_imports(known)
    print("private names imported across modules:", len(priv))
    for line in priv:
        print("  " + line)
    up = upward_imports(known)
    print("imports pointing up:", up or "none")
    print("import cycles (lazy imports counted):", cycles(known) or "none")


if __name__ == "__main__":
    main()
