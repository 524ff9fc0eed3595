"""Fingerprints of the source code that computes each stage, so that a stage's cache key follows its code.

A stage's code is the function in `pipeline.py` that calls `store.stage("<stage>", ...)`, the
pipeline-level helpers it names (not the other stage functions), and every `stat_exp` module
they import, transitively (imports inside functions included), found by parsing the source with
`ast`; nothing is imported. Each file is hashed as its syntax tree without docstrings, so an
edit to comments, docstrings or layout changes no key, while any edit to code does.

Modules in `IGNORED` are left out of every closure, each for the reason given there.
"""

import ast
import hashlib
import logging
from functools import cache
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name

IGNORED = {
    "stat_exp.tracking": "what is logged, not what is computed",
    "stat_exp.plots": "what is drawn, not what is computed",
    "stat_exp.compare": "a sweep's comparison, after every stage",
    "stat_exp.config": "config values enter every key themselves",
    "stat_exp.store": "where artifacts live, not what they hold",
    "stat_exp.code_fingerprint": "how keys are made, not what a stage computes",
    "stat_exp.tasks": "rows a stage reads enter its key by content (tasks.fingerprint)",
    "stat_exp.tasks.loader": "rows a stage reads enter its key by content (tasks.fingerprint)",
    "stat_exp.teacher.oracle": "enters the keys of the stages that ask it, through the teacher's identity",
}


def stage_code(stage: str, package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{source unit: hash} of the code that computes `stage`; units are files, and
    `pipeline.py:<function>` for the pipeline's own functions."""
    stages = _stage_functions(package_dir)
    if stage not in stages:
        raise ValueError(f"no function in {package_dir / 'pipeline.py'} stores stage {stage!r}; "
                         f"stages: {', '.join(sorted(stages))}")
    return stages[stage]


def module_code(module: str, package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{file: hash} of `module` (e.g. "stat_exp.teacher.oracle") and the modules it imports, transitively."""
    return {_relative(path, package_dir): h for path, h in _closure([module], package_dir).items()}


def digest(code: dict[str, str]) -> str:
    """One short hash for a {unit: hash} map."""
    return hashlib.sha256(repr(sorted(code.items())).encode()).hexdigest()[:16]


@cache
def _stage_functions(package_dir: Path) -> dict[str, dict[str, str]]:
    """Every stage stored in pipeline.py, with its code (parsed once per process and package)."""
    tree = _parse(package_dir / "pipeline.py")
    top = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    top |= {target.id: node for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}
    imported = {}  # name bound by a module-level import -> the module it comes from
    for node in tree.body:
        for name, module in _imports(node, package_dir, "stat_exp.pipeline"):
            imported[name] = module
    stored = {name: _stored_stages(node) for name, node in top.items() if isinstance(node, ast.FunctionDef)}
    stage_functions = {name for name, stages in stored.items() if stages}

    result = {}
    for function in stage_functions:
        units, modules, todo = {}, set(), [function]
        while todo:  # the stage function and the pipeline helpers it names, transitively
            name = todo.pop()
            if name in units:
                continue
            node = top[name]
            units[name] = _hash(node)
            modules |= {module for _, module in _imports(node, package_dir, "stat_exp.pipeline", nested=True)}
            for ref in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
                if ref in imported:
                    modules.add(imported[ref])
                elif ref in top and ref not in stage_functions:
                    todo.append(ref)
        code = {f"{PACKAGE}/pipeline.py:{name}": h for name, h in units.items()}
        closure = _closure(modules - IGNORED.keys(), package_dir)
        code |= {_relative(path, package_dir): h for path, h in closure.items()}
        for stage in stored[function]:
            if stage in result:
                raise ValueError(f"stage {stage!r} is stored by two functions of pipeline.py")
            result[stage] = dict(sorted(code.items()))
    return result


def _stored_stages(function: ast.FunctionDef) -> set[str]:
    """Names of the stages a function stores: the literal first argument of its `*.stage(...)` calls."""
    return {node.args[0].value for node in ast.walk(function)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stage"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)}


def _closure(roots: Iterable[str], package_dir: Path) -> dict[Path, str]:
    """{file: hash} of `roots` and every package module they import, transitively, less IGNORED."""
    seen: dict[Path, str] = {}
    todo, done = list(roots), set()
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        path = _module_path(module, package_dir)
        seen[path] = _file_hash(path)
        todo += [m for _, m in _imports(_parse(path), package_dir, module, nested=True) if m not in IGNORED]
    return seen


def _imports(node: ast.AST, package_dir: Path, current: str, nested: bool = False) -> list[tuple[str, str]]:
    """(bound name, package module) for each package import in `node` (its whole subtree if `nested`)."""
    nodes = ast.walk(node) if nested else [node]
    found = []
    for n in nodes:
        if isinstance(n, ast.Import):
            found += [((a.asname or a.name).split(".")[0], a.name) for a in n.names if _ours(a.name)]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative: resolved against the importing module's package
                parts = current.split(".")[: -n.level]
                base = ".".join(parts + ([base] if base else []))
            if not _ours(base):
                continue
            for a in n.names:
                sub = f"{base}.{a.name}"
                found.append((a.asname or a.name, sub if _is_module(sub, package_dir) else base))
    return found


def _ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _is_module(module: str, package_dir: Path) -> bool:
    relative = Path(*module.split(".")[1:])
    return (package_dir / relative).with_suffix(".py").is_file() or (package_dir / relative / "__init__.py").is_file()


def _module_path(module: str, package_dir: Path) -> Path:
    relative = Path(*module.split(".")[1:])
    for path in ((package_dir / relative).with_suffix(".py"), package_dir / relative / "__init__.py"):
        if path.is_file():
            return path
    raise ValueError(f"module {module!r} has no source under {package_dir}")


def _relative(path: Path, package_dir: Path) -> str:
    return f"{PACKAGE}/{path.relative_to(package_dir).as_posix()}"


@cache
def _parse(path: Path) -> ast.Module:
    """`path`'s syntax tree, without docstrings: so comments, docstrings and layout do not count."""
    tree = _parse_source(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _parse_source(source: str, filename: str, attempts: int = 3) -> ast.Module:
    # CPython 3.11 keeps one AST recursion counter per interpreter: a thread that builds an AST at
    # the same time (3.11's traceback formatting does, e.g. a library thread logging an error)
    # breaks this parse with "AST constructor recursion depth mismatch" (CPython gh-106905).
    for attempt in range(attempts):
        try:
            return ast.parse(source, filename=filename)
        except SystemError as err:
            if "recursion depth mismatch" not in str(err) or attempt == attempts - 1:
                raise
            log.debug("parsing %s again after CPython's AST race: %s", filename, err)
    raise AssertionError("unreachable: the last attempt returns or raises")


@cache
def _file_hash(path: Path) -> str:
    return _hash(_parse(path))


def _hash(node: ast.AST) -> str:
    return hashlib.sha256(ast.dump(node).encode()).hexdigest()[:12]
