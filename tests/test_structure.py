"""The package's shape (docs/development.md): layers that import downwards only, counting
imports inside functions; no import cycle; no private name imported across modules; small
modules and functions; a single-process run that loads no distributed module.

Imports under ``if TYPE_CHECKING:`` are exempt: they never run, and the tasks' hooks are typed
against the Plan the engine hands them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kaggle_tta

PACKAGE = Path(kaggle_tta.__file__).parent
ROOT = PACKAGE.parent

# Lower first; a module may import its own layer or any below it. The top-level modules
# (api, cli, __init__, __main__) are placed explicitly.
LAYERS = [
    ["config"],
    ["ops"],
    ["io", "cache"],
    ["exec"],
    ["tasks"],
    ["engine"],
    ["dist"],
    ["api"],
    ["tuning", "kernel", "demo"],
    ["cli", "__main__", "__init__"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 4


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, inside functions and classes too, but not under TYPE_CHECKING."""
    out: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(child)
            walk(child)

    walk(tree)
    return out


def _owner(name: str) -> str | None:
    """The package module a dotted name belongs to (the longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)}."""
    graph: dict[str, set[tuple[str, str | None]]] = {m: set() for m in MODULES}
    for mod, f in MODULES.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _imports(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                pairs = [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, a.name) for a in node.names]
            for target, name in pairs:
                owner = _owner(target) if target.startswith("kaggle_tta") else None
                if owner is not None and owner != mod:
                    graph[mod].add((owner, name))
    return graph


EDGES = _edges()


def _layer(mod: str) -> int:
    parts = mod.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    assert key in LEVEL, f"{mod}: no layer; add its folder to LAYERS (and to docs/development.md)"
    return LEVEL[key]


def test_the_walk_sees_imports_inside_functions():
    assert ("kaggle_tta.engine.stream", None) not in EDGES["kaggle_tta.api"]  # api imports it inside infer()
    assert any(t == "kaggle_tta.engine.stream" for t, _ in EDGES["kaggle_tta.api"])
    assert any(t == "kaggle_tta.dist.launch" for t, _ in EDGES["kaggle_tta.api"])


def test_layers_import_downwards_only():
    wrong = [
        f"{mod} -> {target}"
        for mod, targets in EDGES.items()
        for target, _ in targets
        if _layer(target) > _layer(mod) and target != "kaggle_tta"
    ]
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = {m: {t for t, _ in ts} for m, ts in EDGES.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            cycles.append(" -> ".join(path[path.index(m) :] + [m]))
            return
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(graph[m]):
            visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{mod} imports {name} from {target}"
        for mod, targets in EDGES.items()
        for target, name in targets
        if name and name.startswith("_") and not name.startswith("__")
    ]
    assert not private, "\n".join(sorted(private))


def test_modules_and_functions_are_small():
    big, long = [], []
    for mod, f in MODULES.items():
        src = f.read_text(encoding="utf-8")
        if len(src.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{mod}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert not big and not long, "\n".join(big + long)


def test_few_modules_at_the_top_of_the_package():
    top = sorted(f.name for f in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("command", ["run", "blend"])
def test_a_single_process_run_loads_no_distributed_module(pipeline_file, command):
    """``kaggle-tta run`` in one process (torchrun's variables unset) imports no
    kaggle_tta.dist module, and ``kaggle-tta blend`` not torch either; the probe prints what it
    finds in sys.modules after the command."""
    probe = (
        "import sys\n"
        "from kaggle_tta.cli import main\n"
        f"code = main(['{command}', sys.argv[1], '-q'] if '{command}' == 'run' else ['{command}', sys.argv[1]])\n"
        "print(sorted(m for m in sys.modules if m.startswith('kaggle_tta.dist')))\n"
        "print('torch' in sys.modules)\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if command == "blend":  # the cache filled first (in this process, where torch is loaded already): blend reads it
        import kaggle_tta

        kaggle_tta.run(pipeline_file, progress=False)
    done = subprocess.run(
        [sys.executable, "-c", probe, str(pipeline_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dist_modules, torch_loaded = done.stdout.strip().splitlines()[-2:]
    assert dist_modules == "[]", dist_modules
    # the probe is real: the run did load the heavy modules; a re-blend of timm members reads
    # their preprocessing from the cache's memo, and loads neither timm nor torch
    assert torch_loaded == str(command == "run")


@pytest.fixture
def pipeline_file(tmp_path, demo_images):
    import yaml

    cfg = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    cfg["data"] = {
        "folder": str(demo_images),
        "classes": ["circle", "square", "triangle", "cross"],
    }
    cfg["cache"] = {"dir": str(tmp_path / "cache")}
    cfg["runtime"]["precision"] = "fp32"
    for m in cfg["members"]:
        m["checkpoint"] = str(ROOT / m["checkpoint"])
        m["tta"] = "flips"
    cfg["submission"]["path"] = str(tmp_path / "submission.csv")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
