"""rho's use of megatron-core, checked against a megatron-core source tree without importing it.

megatron-core >= 0.17 needs Python >= 3.12, and no CPU build of torch for 3.12 is at hand on the
machines that run rho's suite, so the suite cannot run on the newest megatron-core there. This
reads rho's sources (every ``from megatron.core... import``, every ``parallel_state.X`` /
``tensor_parallel.X`` / ``dist_checkpointing.X`` attribute, and the keyword arguments rho passes to
megatron-core's configs and constructors) and a megatron-core tree's sources (its modules, their
top-level names, the fields of its config dataclasses with their bases, and the parameters of its
functions), and lists what rho uses that the tree lacks.

    python tests/compat/mcore_api.py /path/to/site-packages     # any tree holding megatron/core
    python tests/compat/mcore_api.py --wheel megatron_core-0.19.2-cp312-*.whl

It proves names and signatures, not behaviour: the suite on Python 3.12 (tests/compat/run_py312.sh,
a documented manual check) does that.
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
import zipfile
from pathlib import Path

RHO = Path(__file__).resolve().parents[2]
RHO_PACKAGES = ("rhocli", "parallel", "cuda_ext")
#: module aliases rho uses for attribute access: local name -> megatron module
ALIASES = {"ps": "megatron.core.parallel_state", "parallel_state": "megatron.core.parallel_state",
           "tensor_parallel": "megatron.core.tensor_parallel", "dist_checkpointing": "megatron.core.dist_checkpointing",
           "mcore_random": "megatron.core.tensor_parallel.random"}
#: callables whose keyword arguments are checked: name rho calls -> (module, class or function)
CALLABLES = {
    "TransformerConfig": ("megatron.core.transformer.transformer_config", "TransformerConfig"),
    "DistributedDataParallelConfig": ("megatron.core.distributed.distributed_data_parallel_config",
                                      "DistributedDataParallelConfig"),
    "DistributedDataParallel": ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel"),
    "OptimizerConfig": ("megatron.core.optimizer.optimizer_config", "OptimizerConfig"),
    "OptimizerParamScheduler": ("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler"),
    "GPTDatasetConfig": ("megatron.core.datasets.gpt_dataset", "GPTDatasetConfig"),
    "initialize_model_parallel": ("megatron.core.parallel_state", "initialize_model_parallel"),
    "get_megatron_optimizer": ("megatron.core.optimizer", "get_megatron_optimizer"),
    "get_gpt_layer_local_spec": ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"),
    "TransformerBlockSubmodules": ("megatron.core.transformer.transformer_block", "TransformerBlockSubmodules"),
    "get_num_layers_to_build": ("megatron.core.transformer.transformer_block", "get_num_layers_to_build"),
    "is_pipeline_first_stage": ("megatron.core.parallel_state", "is_pipeline_first_stage"),
    "is_pipeline_last_stage": ("megatron.core.parallel_state", "is_pipeline_last_stage"),
    "_rho_gpt_model_class()": ("megatron.core.models.gpt.gpt_model", "GPTModel"),
}


# ---------------------------------------------------------------------------------- rho's side
def rho_uses(root: Path = RHO) -> tuple[set[tuple[str, str | None]], dict[str, set[str]]]:
    """(module, name) pairs rho imports or reads (name None: the module itself), and the keyword
    arguments rho passes to each of ``CALLABLES``."""
    uses: set[tuple[str, str | None]] = set()
    keywords: dict[str, set[str]] = {}
    for package in RHO_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron.core"):
                    for alias in node.names:
                        uses.add((node.module, alias.name))
                elif isinstance(node, ast.Import):
                    uses.update((a.name, None) for a in node.names if a.name.startswith("megatron.core"))
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in ALIASES and not node.attr.startswith("__")):
                    uses.add((ALIASES[node.value.id], node.attr))
                elif isinstance(node, ast.Call):
                    name = _callee(node.func)
                    if name in CALLABLES:
                        keywords.setdefault(name, set()).update(k.arg for k in node.keywords if k.arg)
                    # parallel/model.py builds TransformerConfig's optional fields in a ``features``
                    # dict (features.update(k=...)) passed as **features
                    if (isinstance(node.func, ast.Attribute) and node.func.attr == "update"
                            and isinstance(node.func.value, ast.Name) and node.func.value.id == "features"):
                        keywords.setdefault("TransformerConfig", set()).update(k.arg for k in node.keywords if k.arg)
                elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
                      and isinstance(node.value, ast.Name) and node.value.id == "features"
                      and isinstance(node.slice, ast.Constant)):  # features["k"] = ...
                    keywords.setdefault("TransformerConfig", set()).add(node.slice.value)
    return uses, keywords


def _callee(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Call) and isinstance(func.func, ast.Name):
        return func.func.id + "()"
    return None


# ------------------------------------------------------------------------- megatron-core's side
class Tree:
    """A megatron-core source tree (the directory holding ``megatron/``), read with ``ast``."""

    def __init__(self, root: Path):
        self.root = root
        self._parsed: dict[str, ast.Module | None] = {}

    def module_path(self, module: str) -> Path | None:
        base = self.root / Path(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def parse(self, module: str) -> ast.Module | None:
        if module not in self._parsed:
            path = self.module_path(module)
            self._parsed[module] = ast.parse(path.read_text(), str(path)) if path else None
        return self._parsed[module]

    def defines(self, module: str, name: str) -> bool:
        """``module`` has ``name`` at top level (defined, assigned or imported, at any nesting of
        if/try), or as a submodule."""
        if self.module_path(f"{module}.{name}") is not None:
            return True
        tree = self.parse(module)
        if tree is None:
            return False
        return any(name in _bound_names(node) for node in _top_level(tree.body))

    def find(self, module: str, name: str) -> ast.AST | None:
        """The definition of class/function ``name`` in ``module``, following its re-exports."""
        tree = self.parse(module)
        if tree is None:
            return None
        for node in _top_level(tree.body):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
                return node
        for node in _top_level(tree.body):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = node.module if node.level == 0 else _relative(module, node.module, node.level,
                                                                               self.module_path(module))
                        return self.find(source, alias.name)
        return None

    def parameters(self, module: str, name: str) -> set[str] | None:
        """Keyword names ``name(...)`` accepts (a dataclass: its fields with its bases'; a class:
        its __init__'s), or None when it takes ``**kwargs``."""
        node = self.find(module, name)
        if node is None:
            return set()
        if isinstance(node, ast.FunctionDef):
            return _params(node)
        accepted: set[str] = set()
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is not None:
            params = _params(init)
            if params is None:
                return None
            accepted |= params
        accepted |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        for base in node.bases:  # dataclass fields are inherited; find the base where the module imports it
            base_name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
            for source in self._import_sources(module, base_name):
                inherited = self.parameters(source, base_name)
                if inherited is None:
                    return None
                accepted |= inherited
        return accepted

    def _import_sources(self, module: str, name: str | None) -> list[str]:
        tree = self.parse(module)
        if tree is None or name is None:
            return []
        if any(isinstance(n, ast.ClassDef) and n.name == name for n in _top_level(tree.body)):
            return [module]
        found = []
        for node in _top_level(tree.body):
            if isinstance(node, ast.ImportFrom) and node.module and any((a.asname or a.name) == name for a in node.names):
                found.append(node.module if node.level == 0 else
                             _relative(module, node.module, node.level, self.module_path(module)))
        return found


def _top_level(body: list[ast.stmt]):
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _top_level(block)


def _bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, ast.Assign):
        return {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _params(fn: ast.FunctionDef) -> set[str] | None:
    if fn.args.kwarg is not None:
        return None
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs}


def _relative(module: str, target: str, level: int, path: Path | None) -> str:
    parts = module.split(".")
    package = parts if path is not None and path.name == "__init__.py" else parts[:-1]
    return ".".join(package[: len(package) - (level - 1)] + ([target] if target else []))


# -------------------------------------------------------------------------------------- check
def check(tree_root: Path, rho_root: Path = RHO) -> list[str]:
    """What rho uses that the megatron-core tree at ``tree_root`` lacks, one line each."""
    tree = Tree(tree_root)
    if tree.module_path("megatron.core") is None:
        raise FileNotFoundError(f"{tree_root}: no megatron/core in it")
    uses, keywords = rho_uses(rho_root)
    problems = []
    for module, name in sorted(uses, key=lambda u: (u[0], u[1] or "")):
        if tree.module_path(module) is None:
            problems.append(f"module {module} is gone")
        elif name is not None and not tree.defines(module, name):
            problems.append(f"{module}.{name} is gone")
    for callee, used in sorted(keywords.items()):
        module, name = CALLABLES[callee]
        accepted = tree.parameters(module, name)
        if accepted is None:
            continue  # takes **kwargs
        missing = sorted(used - accepted)
        if missing:
            problems.append(f"{module}.{name} no longer takes {', '.join(missing)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rho's megatron-core API use against a megatron-core tree")
    parser.add_argument("tree", nargs="?", type=Path, help="a directory holding megatron/core")
    parser.add_argument("--wheel", type=Path, help="a megatron-core wheel (read without installing)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.tree
        if args.wheel:
            with zipfile.ZipFile(args.wheel) as wheel:
                wheel.extractall(tmp, [n for n in wheel.namelist() if n.startswith("megatron/") and n.endswith(".py")])
            root = Path(tmp)
        if root is None:
            parser.error("give a tree or --wheel")
        problems = check(root)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
