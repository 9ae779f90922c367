"""The package's layer rule, read off the imports of every module (`python -m pytest tests/test_layers.py`).

    config, files, dreambooth_prompts  <-  models  <-  diffusion  <-  io, training
        <-  sampling_flags, eval_report, evaluate, convert, train.py, sample.py

A module imports only from its own layer or the layers below it, and `io` and `training`
never import each other: reading weight files and running a training loop stay independent.
Within a layer, no module imports (at module level) one that imports it back, directly or
through a chain: the package's import graph has no cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minidream"
# Layer of each top-level part of the package; a higher number may import a lower one.
LEVEL = {
    "config": 0, "files": 0, "dreambooth_prompts": 0, "models": 1, "diffusion": 2, "io": 3, "training": 3,
    "sampling_flags": 4, "eval_report": 4, "evaluate": 4, "convert": 4,
}
SIBLINGS_THAT_NEVER_MEET = {frozenset({"io", "training"})}


def part_of(module: str) -> str:
    """'minidream.io.weights' -> 'io'; 'minidream' (the package's lazy API) -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(file: Path) -> set[str]:
    """Every minidream module a file imports, at any depth (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{file}: relative import; minidream imports by full name")
    return {name for name in found if name.split(".")[0] == "minidream"}


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def violations(file: Path, own: str) -> list[str]:
    """What `file`, a module of part `own`, imports against the rule."""
    found = []
    for module in sorted(imported_modules(file)):
        other = part_of(module)
        if other in ("", own) or other not in LEVEL:  # the package itself, its own part, or a name inside a module
            continue
        if frozenset({own, other}) in SIBLINGS_THAT_NEVER_MEET:
            found.append(f"{file} ({own}) imports {module}: io and training never import each other")
        elif LEVEL[other] > LEVEL[own]:
            found.append(f"{file} ({own}, layer {LEVEL[own]}) imports {module} ({other}, layer {LEVEL[other]}): upward")
    return found


@pytest.mark.parametrize("file", package_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_flow_down_and_io_and_training_never_meet(file):
    own = file.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert own in LEVEL, f"{file}: a new top-level part; give it a layer in LEVEL"
    assert violations(file, own) == []


def test_the_scan_sees_real_imports_and_catches_breaches(tmp_path):
    assert "minidream.models.unet" in imported_modules(PACKAGE / "io" / "weights.py")
    assert "minidream.diffusion.sampling" in imported_modules(PACKAGE / "training" / "prior.py")
    upward = tmp_path / "upward.py"
    upward.write_text("def f():\n    from minidream.io.weights import load_pipeline\n")
    assert "upward" in violations(upward, "models")[0]
    sideways = tmp_path / "sideways.py"
    sideways.write_text("import minidream.training.checkpoint\n")
    assert "never import each other" in violations(sideways, "io")[0]


def module_name(file: Path) -> str:
    """minidream/io/weights.py -> 'minidream.io.weights'; minidream/io/__init__.py -> 'minidream.io'."""
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run when a module is imported: its body, and what `if`, `try` and `with`
    hold there, but not function or class bodies (imports there run later, when called)."""
    found = []
    for node in body:
        found.append(node)
        if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            found += top_level_statements(node.body) + top_level_statements(node.orelse)
        elif isinstance(node, ast.Try):
            found += top_level_statements([*node.body, *node.orelse, *node.finalbody])
            found += [stmt for handler in node.handlers for stmt in top_level_statements(handler.body)]
        elif isinstance(node, ast.With):
            found += top_level_statements(node.body)
    return found


def module_level_imports(file: Path, own: str, modules: set[str]) -> set[str]:
    """The modules of `modules` that importing `file` (module `own`) imports (`from a.b import c`
    is module a.b.c when that is a module, else a.b), with their packages' __init__ but own's."""
    found = set()
    for node in top_level_statements(ast.parse(file.read_text(), filename=str(file)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                         for alias in node.names)
    with_packages = {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 2)}
    return {name for name in with_packages if name in modules and name != own and not own.startswith(f"{name}.")}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A chain a -> b -> ... -> a for each cycle a depth-first walk of `graph` meets."""
    cycles, done = [], set()

    def walk(path: list[str]) -> None:
        for following in sorted(graph.get(path[-1], ())):
            if following in path:
                cycles.append(path[path.index(following):] + [following])
            elif following not in done:
                walk([*path, following])
        done.add(path[-1])

    for start in sorted(graph):
        if start not in done:
            walk([start])
    return cycles


def package_import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): module_level_imports(f, module_name(f), modules) for f in files}


def test_no_module_imports_one_that_imports_it_back():
    assert [" -> ".join(cycle) for cycle in import_cycles(package_import_graph())] == []


def test_the_cycle_scan_sees_module_level_imports_and_finds_chains(tmp_path):
    graph = package_import_graph()
    assert "minidream.models.unet" in graph["minidream.io.weights"]
    assert "minidream.io.weights" not in graph["minidream"]  # the package's lazy API imports inside a function
    late = tmp_path / "late.py"
    late.write_text("import minidream.config\ntry:\n    from minidream.io import weights\nexcept ImportError:\n    pass\n"
                    "def f():\n    from minidream.models import unet\n")
    found = module_level_imports(late, "minidream.late", set(graph))  # its own package, minidream, left out
    assert found == {"minidream.config", "minidream.io", "minidream.io.weights"}
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []
