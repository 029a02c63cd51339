"""The layering, read from the source: every import of every module (lazy ones inside functions
included) must point down, never sideways between stages, and never close a cycle; engine and kernel
messages never name a CLI flag; the error table covers every engine error type.

    CLI        rhocli.app, rhocli.__main__, rhocli.commands.*     (the only code that prints)
    stages     rhocli.<stage>.*  for tokenize, train, score, select, convert, bench, demo, verify, eval, analyze
    core       rhocli.core.*                                      (leaf utilities, formats)
    engine     parallel.*
    kernels    cuda_ext.*
    recipes    experiments/*.py: the public entry (rhocli.app.invoke) and rhocli.core only

Allowed: a layer imports the layers below it; core and the engine are siblings below the stages and
neither imports the other (core is a leaf); a stage imports no other stage; ``rhocli`` itself (the
version) is free for all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rhocli", "parallel", "cuda_ext")
STAGES = ("tokenize", "train", "score", "select", "convert", "bench", "demo", "verify", "eval", "analyze")
RANK = {"cli": 4, "stage": 3, "core": 2, "engine": 2, "kernels": 1, "root": 0}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, str | None]:
    """(layer, stage) of one of rho's modules; raises for a module that sits in no layer."""
    parts = module.split(".")
    if module == "rhocli":  # the version only
        return "root", None
    if module == "rhocli.__main__":
        return "cli", None
    if parts[0] == "experiments":
        return "recipe", None
    if parts[0] == "parallel":
        return "engine", None
    if parts[0] == "cuda_ext":
        return "kernels", None
    if parts[1] in ("app", "commands"):
        return "cli", None
    if parts[1] == "core":
        return "core", None
    if parts[1] in STAGES:
        return "stage", parts[1]
    raise AssertionError(f"{module}: not in any layer (rhocli/ holds app.py, commands/, core/ and the stage folders)")


def sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return sorted(files + list((ROOT / "experiments").glob("*.py")))


def imports_of(path: Path) -> set[str]:
    """Every rho module ``path`` imports, at module level or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` is an import of the module pkg.mod; `from mod import name`, of mod
            subs = [f"{base}.{a.name}" for a in node.names if _exists(f"{base}.{a.name}")]
            names = subs + ([base] if len(subs) < len(node.names) else [])
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and _exists(name):
                found.add(name)
    return found


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sources()}


def arrow_problem(src: str, dst: str) -> str | None:
    """Why the import ``src -> dst`` breaks the layering, or None when it is allowed."""
    s_layer, s_stage = layer_of(src)
    d_layer, d_stage = layer_of(dst)
    if d_layer == "root":
        return None
    if s_layer == "recipe":
        ok = dst == "rhocli.app" or d_layer == "core"
        return None if ok else "a recipe runs rho's command lines (rhocli.app.invoke), not internals"
    if d_layer == "recipe":
        return "nothing imports a recipe"
    if s_layer == d_layer:
        return "sideways between stages" if s_stage != d_stage else None
    if s_layer == "core":
        return f"core is a leaf: it imports no {d_layer} (pass what it needs as an argument)"
    if s_layer == "engine" and d_layer == "core":
        return "the engine never imports rhocli (pass what it needs as an argument)"
    if RANK[d_layer] >= RANK[s_layer]:
        return f"points up ({s_layer} -> {d_layer})"
    return None


def violations(edges: dict[str, set[str]]) -> list[str]:
    return [f"{src} -> {dst}: {problem}" for src, targets in sorted(edges.items()) for dst in sorted(targets)
            if (problem := arrow_problem(src, dst)) is not None]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
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
                result.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return result


def test_every_module_sits_in_a_layer():
    for path in sources():
        layer_of(module_name(path))


def test_imports_point_down_and_never_sideways():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_rules_catch_what_they_are_for():
    """The checker itself: an upward, a sideways and a cyclic import are each reported."""
    edges = {
        "parallel.trainer": {"rhocli.core.formats.metrics"},
        "rhocli.score.spec": {"rhocli.convert.hf"},
        "rhocli.core.launch": {"rhocli.commands.score"},
        "rhocli.commands.score": {"rhocli.core.launch"},
        "cuda_ext.ops": {"parallel.loss"},
    }
    found = violations(edges)
    assert any("parallel.trainer -> rhocli.core.formats.metrics: the engine never imports rhocli" in v for v in found)
    assert any("sideways" in v for v in found)
    assert any("rhocli.core.launch -> rhocli.commands.score: core is a leaf" in v for v in found)
    assert any("rhocli.demo.pipeline -> rhocli.app: points up" in v for v in violations({"rhocli.demo.pipeline": {"rhocli.app"}}))
    assert any("cuda_ext.ops -> parallel.loss: points up" in v for v in found)
    assert cycles(edges) == [["rhocli.commands.score", "rhocli.core.launch"]]


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def test_engine_and_kernel_errors_name_no_cli_flag():
    """The engine words its errors in its own terms; the CLI names flags (``rhocli.app.message_for``)."""
    found = []
    for path in sorted([*(ROOT / "parallel").rglob("*.py"), *(ROOT / "cuda_ext").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for sub in ast.walk(node.exc):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and FLAG.search(sub.value):
                        found.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {sub.value!r}")
    assert found == []


def test_every_engine_error_has_a_category():
    import inspect

    import cuda_ext.errors
    import parallel.errors
    from rhocli.core.errors import ENGINE_ERRORS, RhoError

    declared = {f"{m.__name__}.{name}" for m in (parallel.errors, cuda_ext.errors)
                for name, cls in inspect.getmembers(m, inspect.isclass)
                if issubclass(cls, Exception) and cls.__module__ == m.__name__ and name != "EngineError"}
    assert declared == set(ENGINE_ERRORS)
    assert all(issubclass(c, RhoError) for c in ENGINE_ERRORS.values())
