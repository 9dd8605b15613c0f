"""Print the code-shape figures that issue 23 tracks: module sizes, the longest functions, the functions with
the most parameters, argparse calls, the modules that name run-directory files, and import cycles (imports
inside functions included). Run from the project root: `python3 scripts/code_metrics.py`."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PKG = Path("src/igpt")
RUN_FILES = re.compile(
    r"""["'](run\.json|summary\.json|metrics\.jsonl|finetune[\w{}]*\.json|probe[\w{}]*\.json"""
    r"""|state\.json|low_data\.json|attentive\.json|samples\.json)["']"""
)


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


def imports(path: Path, tree: ast.AST) -> set[str]:
    """Sibling modules of igpt that this module imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("igpt."):
            out.add(node.module.split(".")[1])
    return out - {path.stem}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, i = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = i[0]
        i[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    mods = sorted(PKG.glob("*.py"))
    sizes, funcs, graph, naming = [], [], {}, []
    for p in mods:
        text = p.read_text()
        tree = ast.parse(text)
        sizes.append((len(text.splitlines()), p.name))
        for name, f in functions(tree):
            a = f.args
            n_params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            if a.args and a.args[0].arg in ("self", "cls"):
                n_params -= 1
            funcs.append((f.end_lineno - f.lineno + 1, n_params, f"{p.stem}.{name}"))
        graph[p.stem] = imports(p, tree)
        hits = sorted(set(RUN_FILES.findall(text)))
        if hits:
            naming.append((p.name, hits))
    print("largest modules (lines):", ", ".join(f"{n} {s}" for s, n in sorted(sizes, reverse=True)[:8]))
    print("longest functions (lines):", ", ".join(f"{n} {s}" for s, _, n in sorted(funcs, reverse=True)[:8]))
    print("most parameters:", ", ".join(f"{n} {k}" for _, k, n in sorted(funcs, key=lambda t: -t[1])[:6]))
    print(
        "functions over 80 lines:",
        sum(s > 80 for s, _, _ in funcs),
        "| with more than 12 parameters:",
        sum(k > 12 for _, k, _ in funcs),
    )
    cli = (PKG / "cli.py").read_text()
    print("add_argument calls in cli.py:", cli.count("add_argument("))
    print("modules naming run-directory files:", len(naming))
    for name, hits in naming:
        print(f"  {name}: {', '.join(hits)}")
    cyc = cycles(graph)
    print("import cycles (lazy imports counted):", cyc if cyc else "none")


if __name__ == "__main__":
    main()
