"""The package layout and dvc.yaml, checked statically with `ast` (nothing under src/ is imported).

Layout rules (docs/ARCHITECTURE.md): the stage entries at the top of src/ are thin and never
import each other; the library packages under src/<package>/ never import a stage; src.artifacts
builds on src.core only; project modules import each other without cycles, and at module top
unless a comment says why.

dvc.yaml rules: a stage reruns when anything its output depends on changes, so its `deps`
cover every project module `python -m src.<stage>` can import (module- and function-level
imports both run), and its `params` cover every params key those modules read.
"""
from __future__ import annotations

import ast
import functools
import io
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIG = "src/core/config.py"
DVC_YAML = ROOT / "dvc.yaml"
# The params root: a call to one of these returns a whole `Params`.
PARAMS_FACTORIES = {"params_from_args", "load_params", "params_from_dict", "with_values"}
# DVC stages run `python -m src.<module>`; the modules that are entries but no DVC stage.
NOT_DVC_STAGES = {"src/tune.py", "src/predict.py", "src/promote.py"}


# ------------------------------------------------------------------------- the analysis
@dataclass(frozen=True)
class Import:
    source: str            # "src/train.py"
    line: int
    end_line: int
    text: str              # "src.model.fit" (what the statement names, for messages)
    target: str | None     # the module file it loads, None when it does not resolve
    in_function: bool
    type_checking: bool


@dataclass
class Module:
    path: str
    tree: ast.Module
    comment_lines: set[int]
    imports: list[Import] = field(default_factory=list)


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def module_file(dotted: str) -> str | None:
    """'src.core.config' -> 'src/core/config.py' ('src' -> 'src/__init__.py'); None if absent."""
    base = ROOT.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return rel(base.with_suffix(".py"))
    if (base / "__init__.py").is_file():
        return rel(base / "__init__.py")
    return None


def is_package_dir(dotted: str) -> bool:
    return ROOT.joinpath(*dotted.split(".")).is_dir()


def is_project(dotted: str | None) -> bool:
    return dotted is not None and (dotted == "src" or dotted.startswith("src."))


def dotted_of(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def resolve_import(node: ast.Import | ast.ImportFrom, path: str) -> list[tuple[str, str | None]]:
    """(what the statement names, module file it loads or None) for each project module it loads."""
    out: list[tuple[str, str | None]] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if is_project(alias.name):
                out.append((alias.name, module_file(alias.name)))
        return out
    base = node.module
    if node.level:  # relative: anchored at this module's package
        package = dotted_of(path).split(".")
        if not path.endswith("__init__.py"):
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    if not is_project(base):
        return out
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if alias.name != "*" and module_file(sub):
            out.append((sub, module_file(sub)))             # `from src.model import fit`
        elif module_file(base):
            out.append((f"{base}:{alias.name}", module_file(base)))  # a name from a module
        else:
            out.append((sub, None))                           # neither: a broken import
    return out


def collect_imports(mod: Module) -> None:
    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for text, target in resolve_import(node, mod.path):
                mod.imports.append(Import(mod.path, node.lineno, node.end_lineno or node.lineno, text, target,
                                          in_function, type_checking))
            return
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, type_checking)
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(mod.tree, False, False)


def comment_lines(source: str) -> set[int]:
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, Module]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        source = p.read_text(encoding="utf-8")
        mod = Module(rel(p), ast.parse(source, filename=str(p)), comment_lines(source))
        collect_imports(mod)
        out[mod.path] = mod
    return out


def stage_modules() -> set[str]:
    """The entries: src/*.py at the top, bar the package's __init__.py."""
    return {rel(p) for p in SRC.glob("*.py") if p.name != "__init__.py"}


def library_modules() -> set[str]:
    return {path for path in modules() if len(Path(path).parts) > 2}


def edges(*, runtime_only: bool = False, module_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {path: set() for path in modules()}
    for mod in modules().values():
        for imp in mod.imports:
            if imp.target is None or (runtime_only and imp.type_checking) or (module_level_only and imp.in_function):
                continue
            graph[mod.path].add(imp.target)
    return graph


def closure(entry: str) -> set[str]:
    """Every module file `python -m <entry>` can execute: the imports that run (module- and
    function-level, not the `if TYPE_CHECKING:` ones), transitively, and the packages'
    __init__.py files that importing them runs."""
    graph = edges(runtime_only=True)
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(graph[path])
        parts = Path(path).parts
        for i in range(1, len(parts)):
            init = Path(*parts[:i], "__init__.py").as_posix()
            if init in modules():
                todo.append(init)
    return seen


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> b -> ... -> a) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is a few dozen nodes deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:
        start = min(comp)
        # breadth-first from start back to start inside the component: a shortest cycle
        prev: dict[str, str] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append(list(reversed(path)) + [start])
    return cycles


# ----------------------------------------------------------------------- params reads
@functools.lru_cache(maxsize=None)
def schema() -> tuple[dict[str, dict[str, str | None]], dict[str, str]]:
    """From src/core/config.py: {model class: {field: model class of the field or None}} and
    {section model class: its dotted place in params.yaml}, e.g. AugmentParams -> train.augment."""
    tree = modules()[CONFIG].tree
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def field_class(ann: ast.expr) -> str | None:
        if isinstance(ann, ast.Name):
            return ann.id if ann.id in classes else None
        if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Optional":
            return field_class(ann.slice)
        if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
            return field_class(ann.left) or field_class(ann.right)
        return None  # a leaf: dict[str, SpaceEntry], list[...], a scalar

    fields = {
        name: {stmt.target.id: field_class(stmt.annotation)
               for stmt in cls.body if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
        for name, cls in classes.items()
    }
    places: dict[str, str] = {}
    todo = [("Params", "")]
    while todo:
        cls, place = todo.pop()
        for name, sub in fields[cls].items():
            if sub and sub not in places:
                places[sub] = f"{place}.{name}" if place else name
                todo.append((sub, places[sub]))
    return {c: f for c, f in fields.items() if c == "Params" or c in places}, places


def sections() -> list[str]:
    return list(schema()[0]["Params"])


def resolve_key(parts: list[str]) -> str | None:
    """['train', 'augment', 'noise'] -> 'train.augment.noise'; the walk stops at the first part
    that is no field (`params.train.model_dump` reads 'train'); None when no section is named."""
    fields, _ = schema()
    cls: str | None = "Params"
    key: list[str] = []
    for part in parts:
        if cls is None or part not in fields[cls]:
            break
        key.append(part)
        cls = fields[cls][part]
    return ".".join(key) or None


def chain(node: ast.Attribute) -> tuple[ast.expr, list[str]]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return node, parts[::-1]


def annotation_classes(ann: ast.expr | None) -> set[str]:
    if ann is None:
        return set()
    names = set()
    for node in ast.walk(ann):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # "TrainParams"
            try:
                names |= annotation_classes(ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                pass
    return names


@functools.lru_cache(maxsize=None)
def params_reads(path: str) -> frozenset[tuple[str, int]]:
    """(dotted params key, line) for each read of params in a module:
    - `params.<section>[.<key>...]`, `self.params.<section>...`, `params_from_args(a).<section>...`,
      `<name annotated Params>.<section>...`, resolved against the schema as far as it names fields;
    - a function parameter annotated with a section model (`cfg: TrainParams`) reads that section.
    Whole-object uses (`flatten(params)`, `params.model_dump()`) name no section and are ignored."""
    _, places = schema()
    tree = modules()[path].tree
    roots = {"params"}
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and "Params" in annotation_classes(node.annotation):
            roots.add(node.arg)
    reads = set()
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # a whole chain a.b.c
            base, parts = chain(node)
            if isinstance(base, ast.Name) and base.id in roots:
                key = resolve_key(parts)
            elif isinstance(base, ast.Name) and base.id == "self" and parts[:1] == ["params"]:
                key = resolve_key(parts[1:])
            elif isinstance(base, ast.Call) and (
                    (isinstance(base.func, ast.Name) and base.func.id in PARAMS_FACTORIES)
                    or (isinstance(base.func, ast.Attribute) and base.func.attr in PARAMS_FACTORIES)):
                key = resolve_key(parts)
            else:
                key = None
            if key:
                reads.add((key, node.lineno))
        elif isinstance(node, ast.arg):
            for cls in annotation_classes(node.annotation) & set(places):
                reads.add((places[cls], node.lineno))
    return frozenset(reads)


# -------------------------------------------------------------------------- dvc.yaml
@functools.lru_cache(maxsize=None)
def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load(DVC_YAML.read_text())["stages"]


def stage_entry(name: str) -> str:
    cmd = dvc_stages()[name]["cmd"]
    m = re.fullmatch(r"python -m (src(?:\.\w+)+)(?:\s.*)?", cmd.strip())
    assert m, f"dvc.yaml stage {name}: cmd {cmd!r} is not `python -m src.<module>`"
    path = module_file(m.group(1))
    assert path, f"dvc.yaml stage {name}: {m.group(1)} is no module under src/"
    return path


def stage_deps(name: str) -> list[str]:
    """The file/folder deps, normalised; `${...}` ones (data, other stages' outputs) are left out."""
    out = []
    for dep in dvc_stages()[name].get("deps") or []:
        dep = dep if isinstance(dep, str) else next(iter(dep))
        if "${" not in dep:
            out.append(Path(dep).as_posix().rstrip("/"))
    return out


def stage_params(name: str) -> list[str]:
    out = []
    for entry in dvc_stages()[name].get("params") or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            for file, keys in entry.items():
                if Path(file).name == "params.yaml":
                    out.extend(keys or [])
    return out


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") or d == "." for d in deps)


def key_covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def stage_reads(name: str) -> dict[str, list[str]]:
    """{params key: ['file:line', ...]} over the stage's import closure, config.py excepted."""
    reads: dict[str, list[str]] = {}
    for path in sorted(closure(stage_entry(name)) - {CONFIG}):
        for key, line in sorted(params_reads(path)):
            reads.setdefault(key, []).append(f"{path}:{line}")
    return reads


def dvc_stage_names() -> list[str]:
    return list(dvc_stages())


# ------------------------------------------------------------------------------- tests
def test_every_project_import_resolves_to_a_file():
    broken = [f"{imp.source}:{imp.line}: {imp.text}" for mod in modules().values()
              for imp in mod.imports if imp.target is None]
    assert not broken, "project imports that name no module file:\n" + "\n".join(broken)


def test_stage_entries_never_import_each_other():
    stages = stage_modules()
    bad = [f"{imp.source}:{imp.line}: imports stage {imp.target}" for path in sorted(stages)
           for imp in modules()[path].imports if imp.target in stages and imp.target != path]
    assert not bad, "a stage entry imports another stage (move the shared code into a package):\n" + "\n".join(bad)


def test_library_packages_never_import_stage_modules():
    stages = stage_modules()
    bad = [f"{imp.source}:{imp.line}: imports stage {imp.target}" for path in sorted(library_modules())
           for imp in modules()[path].imports if imp.target in stages]
    assert not bad, "a library module imports a stage entry:\n" + "\n".join(bad)


def test_artifacts_depends_only_on_core():
    allowed = ("src/core/", "src/artifacts/")
    bad = [f"{imp.source}:{imp.line}: imports {imp.target}" for path in sorted(modules())
           if path.startswith("src/artifacts/") for imp in modules()[path].imports
           if imp.target and not imp.target.startswith(allowed) and imp.target != "src/__init__.py"]
    assert not bad, "src.artifacts may build on src.core only:\n" + "\n".join(bad)


# The package map (docs/ARCHITECTURE.md and each package's docstring): what each may import.
PACKAGE_MAY_IMPORT = {
    "core": set(),
    "artifacts": {"core"},
    "synthetic": {"core", "artifacts"},
    "data": {"core", "artifacts"},
    "evaluation": {"core", "artifacts"},
    "model": {"core", "artifacts", "data", "evaluation"},
    "localise": {"core", "artifacts", "data", "evaluation", "model", "synthetic"},
    "explain": {"core", "artifacts", "data", "model"},
    "tuning": {"core", "artifacts", "data", "evaluation", "model"},
    "serving": {"core", "artifacts", "data", "evaluation", "model", "explain", "localise"},
}


def test_packages_import_only_what_the_package_map_allows():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(PACKAGE_MAY_IMPORT), "a package was added or removed: update the map here and in the docs"
    bad = []
    for path, mod in sorted(modules().items()):
        parts = Path(path).parts
        if len(parts) < 3:
            continue  # stage entries and src/__init__.py
        own = parts[1]
        for imp in mod.imports:
            target = Path(imp.target).parts if imp.target else ()
            if len(target) >= 3 and target[1] != own and target[1] not in PACKAGE_MAY_IMPORT[own]:
                bad.append(f"{imp.source}:{imp.line}: src.{own} imports {imp.target}")
    assert not bad, "imports outside the package map:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(edges(runtime_only=True, module_level_only=True))
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def uncommented_function_imports(mod: Module) -> list[Import]:
    """Project imports in a function body with no comment on their lines or the line above."""
    return [imp for imp in mod.imports
            if imp.in_function and not ({imp.line - 1, *range(imp.line, imp.end_line + 1)} & mod.comment_lines)]


def test_project_imports_at_module_top_unless_a_comment_says_why():
    bad = [f"{imp.source}:{imp.line}: {imp.text}" for mod in modules().values()
           for imp in uncommented_function_imports(mod)]
    assert not bad, ("project imports inside a function without a comment saying why "
                     "(move them to the module top, or comment on the line or the line above):\n"
                     + "\n".join(sorted(set(bad))))


def test_dvc_stage_deps_cover_the_import_closure():
    missing = {}
    for name in dvc_stage_names():
        deps = stage_deps(name)
        gap = sorted(p for p in closure(stage_entry(name)) if not covered(p, deps))
        if gap:
            missing[name] = gap
    assert not missing, "dvc.yaml deps miss modules the stage runs:\n" + "\n".join(
        f"  {name}: {', '.join(gap)}" for name, gap in missing.items())


def test_dvc_stage_deps_exist():
    gone = [f"{name}: {dep}" for name in dvc_stage_names() for dep in stage_deps(name) if not (ROOT / dep).exists()]
    assert not gone, "dvc.yaml deps that do not exist (dvc repro stops on them):\n" + "\n".join(gone)


def test_dvc_stage_params_cover_the_params_read():
    missing = {}
    for name in dvc_stage_names():
        declared = stage_params(name)
        gap = {key: where for key, where in stage_reads(name).items() if not key_covered(key, declared)}
        if gap:
            missing[name] = gap
    assert not missing, "dvc.yaml params miss keys the stage reads:\n" + "\n".join(
        f"  {name}: {key} (read at {', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
        for name, gap in missing.items() for key, where in sorted(gap.items()))


def test_dvc_stage_params_name_real_keys():
    bad = [f"{name}: {key}" for name in dvc_stage_names() for key in stage_params(name)
           if resolve_key(key.split(".")) != key]
    assert not bad, "dvc.yaml params that are no key of params.yaml's schema:\n" + "\n".join(bad)


def test_dvc_stages_run_the_entries():
    entries = {name: stage_entry(name) for name in dvc_stage_names()}
    assert set(entries.values()) <= stage_modules()
    assert set(entries.values()) == stage_modules() - NOT_DVC_STAGES, entries
    assert entries["synthesize"] == "src/phantom.py"


def test_the_analysis_sees_the_pipeline():
    """The checks above are not vacuous: the graph, the closures and the reads find what a
    reader of the code finds."""
    assert {"src/train.py", "src/phantom.py", "src/tune.py", "src/predict.py"} <= stage_modules()
    assert {"src/core/config.py", "src/model/fit.py", "src/artifacts/store.py"} <= library_modules()
    assert sum(len(v) for v in edges().values()) > 50

    train = closure(stage_entry("train"))
    assert {"src/train.py", "src/model/fit.py", "src/core/config.py", "src/__init__.py"} <= train
    assert "src/tune.py" not in train

    assert sections() == ["data", "phantom", "prepare", "locate", "train", "evaluate", "gradcam", "tune", "register", "mlflow"]
    _, places = schema()
    assert {"TrainParams": "train", "AugmentParams": "train.augment", "GateParams": "register.gate",
            "MlflowParams": "mlflow", "PhantomParams": "phantom"}.items() <= places.items()
    assert resolve_key(["train", "augment", "noise"]) == "train.augment.noise"
    assert resolve_key(["train", "model_dump"]) == "train"
    assert resolve_key(["model_dump"]) is None

    reads = stage_reads("train")
    assert "train" in reads and "evaluate.threshold" in reads and "mlflow" in reads
    assert "gradcam" not in stage_reads("synthesize")
    assert "phantom" in stage_reads("synthesize")  # `params_from_args(args).phantom` in src/phantom.py


def test_the_checks_catch_what_they_are_for():
    """The rules fire on a small made-up graph and module."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": set()}
    cycles = find_cycles(graph)
    assert sorted(map(tuple, cycles)) == [("a", "b", "c", "a"), ("d", "d")]
    assert not find_cycles({"a": {"b"}, "b": set()})

    assert covered("src/core/config.py", ["src/core"]) and not covered("src/core/config.py", ["src/cor"])
    assert key_covered("train.augment.noise", ["train.augment"]) and not key_covered("train", ["train.lr"])
    assert not key_covered("evaluate.threshold", ["evaluate.thresholds"])

    source = (
        "from src.core import config\n"
        "def f(params, cfg: 'GateParams'):\n"
        "    # config is slow to import\n"
        "    from src.core.config import Params\n"
        "    from src.model import fit\n"
        "    return params.train.lr, self.params.evaluate.threshold, params.model_dump(), params.nope\n"
    )
    mod = Module("src/_probe.py", ast.parse(source), comment_lines(source))
    collect_imports(mod)
    assert [(i.line, i.target, i.in_function) for i in mod.imports] == [
        (1, "src/core/config.py", False), (4, "src/core/config.py", True), (5, "src/model/fit.py", True)]
    assert [imp.line for imp in uncommented_function_imports(mod)] == [5]
    modules()[mod.path] = mod
    try:
        params_reads.cache_clear()
        assert {key for key, _ in params_reads(mod.path)} == {"train.lr", "evaluate.threshold", "register.gate"}
    finally:
        del modules()[mod.path]
        params_reads.cache_clear()


@pytest.mark.parametrize("stage", ["evaluate", "prepare", "phantom"])
def test_stages_that_train_nothing_do_not_load_torch(stage):
    """Importing evaluate used to load torch for two file names; stages that never touch a tensor
    stay light (a few seconds less for every `dvc repro` of them, and no CUDA init)."""
    code = f"import sys, src.{stage}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
