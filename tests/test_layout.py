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
