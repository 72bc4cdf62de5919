"""The repository's shape: ``platform/`` is a source root, never a package, and the tests mirror the library."""

import importlib
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "llava_platform"
# Modules without behaviour of their own to test.
NOT_MIRRORED = {"__init__.py", "errors.py"}


def test_platform_dir_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_still_imports_with_repo_on_path():
    # Ray puts the job's working dir first on PYTHONPATH: the repo root must not shadow the stdlib.
    code = "import platform, sys; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert Path(out[0]).resolve().is_relative_to(Path(sysconfig.get_paths()["stdlib"]).resolve())
    assert out[1] == ".".join(map(str, sys.version_info[:3]))


def test_library_imports_from_source_root():
    mod = importlib.import_module("llava_platform")
    assert Path(mod.__file__).resolve().parent == PACKAGE.resolve()


def test_tests_mirror_the_package():
    missing = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in NOT_MIRRORED:
            continue
        rel = path.relative_to(PACKAGE)
        expected = REPO / "tests" / "unit" / rel.parent / f"test_{rel.name}"
        if not expected.exists():
            missing.append(str(expected.relative_to(REPO)))
    assert not missing, f"library modules without a mirrored test file: {missing}"


# ---------------------------------------------------------------------------------------------
# Layers: which rooms may import which (every import counts, at module level or inside a function)
# ---------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (``from llava_platform import storage`` counts as
    ``llava_platform.storage``; the bare package, which holds only the version, is left out)."""
    import ast

    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name == "llava_platform":
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            found.update(c for c in candidates if c in modules and c not in (name, "llava_platform"))
        graph[name] = found
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_cycles():
    graph = _import_graph()
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


# Room -> the rooms it may import (besides itself). Entry points (cli, demo, jobs, preprocess) and
# train may import what they need below them; nothing imports them except entry points.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "storage": {"config", "errors"},
    "locations": {"config", "storage", "errors"},
    "ray_utils": {"errors"},
    "tracking": {"config", "storage", "errors"},
    "data": {"config", "storage", "locations", "errors"},
    "model": {"config", "storage", "tracking", "data", "errors"},
    "inference": {"config", "storage", "data", "model", "errors"},
    "eval": {"config", "storage", "locations", "ray_utils", "tracking", "data", "model", "inference", "errors"},
    "serve": {"config", "storage", "locations", "tracking", "data", "model", "inference", "errors"},
    "train": {"config", "storage", "locations", "ray_utils", "tracking", "data", "model", "errors"},
    "preprocess": {"config", "storage", "locations", "data", "model", "errors"},
}
ENTRY_POINTS = {"cli", "demo", "jobs"}


def test_each_room_imports_only_the_rooms_below_it():
    wrong = sorted(f"{m} -> {n}" for m, targets in _import_graph().items() for n in targets
                   if _room(m) != _room(n) and _room(m) not in ENTRY_POINTS and _room(n) not in ALLOWED[_room(m)])
    assert not wrong, f"imports across layers: {wrong}"
    rooms = {_room(m) for m in _import_graph()}
    assert rooms <= set(ALLOWED) | ENTRY_POINTS, f"rooms without a rule: {rooms - set(ALLOWED) - ENTRY_POINTS}"


MAX_MODULE_LINES = 400


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {long}"
