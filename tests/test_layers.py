"""The dependency rule of stitchvm/__init__.py, checked on every import statement of the library."""
import ast
from pathlib import Path

import pytest

import stitchvm

ROOT = Path(stitchvm.__file__).resolve().parent
LAYERS = {
    "config": 0, "profiling": 0, "progress": 0, "lr_schedule": 0, "data": 0, "distributed": 0, "checkpoint_folder": 0,
    "models": 1,
    "diffusion": 2,
    "value": 3,
    "guidance": 4, "alignment": 4, "world": 4,
    "stages": 5,
    "benchmarks": 6, "smoke": 6, "__main__": 6,
}
OPEN_LAYERS = {0, 6}  # foundations may use each other, and so may the entry points; layer 4's packages may not


def top(module: str) -> str:
    """The top-level part of a stitchvm module name (`stitchvm.value.model` -> `value`)."""
    return module.split(".")[1]


def imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every stitchvm import in the file at `path` (or of `text` as if it were there),
    relative imports resolved."""
    package = ".".join(("stitchvm", *path.relative_to(ROOT).with_suffix("").parts))
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("stitchvm.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "stitchvm":  # `from stitchvm import x`: x is the top-level module
                found += [(node.lineno, f"stitchvm.{a.name}") for a in node.names]
            elif module.startswith("stitchvm."):
                found.append((node.lineno, module))
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.parent != ROOT or p.name != "__init__.py")


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_has_a_layer():
    assert {layer_of(p) for p in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    here = layer_of(path)
    for line, module in imports(path):
        there = top(module)
        assert there in LAYERS, f"{path.name}:{line} imports {module}, which has no layer"
        ok = LAYERS[there] < LAYERS[here] or there == here or LAYERS[there] == LAYERS[here] in OPEN_LAYERS
        assert ok, (f"{path.relative_to(ROOT)}:{line} ({here}, layer {LAYERS[here]}) imports {module} "
                    f"({there}, layer {LAYERS[there]}): imports run from higher layers to lower ones only")


def test_the_rule_sees_a_violation():
    """Absolute and relative imports of a higher layer, written in a models module, are found and resolved."""
    text = "from stitchvm.stages.runtime import models\nfrom ..value import model\nimport stitchvm.guidance.fk\n"
    found = [m for _, m in imports(ROOT / "models" / "probe.py", text)]
    assert found == ["stitchvm.stages.runtime", "stitchvm.value", "stitchvm.guidance.fk"]
    assert all(LAYERS[top(m)] > LAYERS["models"] for m in found)
