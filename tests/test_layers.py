"""The package's layer rule, read off the imports of every module (`python -m pytest tests/test_layers.py`).

    config, files, dreambooth_prompts  <-  models  <-  diffusion  <-  io, training
        <-  sampling_flags, eval_report, evaluate, convert, train.py, sample.py

A module imports only from its own layer or the layers below it, and `io` and `training`
never import each other: reading weight files and running a training loop stay independent.
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
