"""scripts/import_cycles.py, the CI check that longext/ has no import circle: it must find a circle where there is
one (lazy imports, relative imports and `from package import submodule` included) and pass a package without."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_cycles.py"


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def check(package: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(package)], capture_output=True, text=True)


def test_a_circle_through_a_lazy_import_is_found_and_fails(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from pkg.b import helper\n",
        "b.py": "def helper():\n    from pkg import c\n    return c\n",
        "c.py": "import pkg.a\n",
        "d.py": "from pkg.a import helper\n",  # reaches the circle but is not on it
    })
    done = check(package)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "import circle: pkg.a -> pkg.b -> pkg.c -> pkg.a" in done.stdout
    assert "modules tied together (3): pkg.a, pkg.b, pkg.c" in done.stdout
    assert "pkg.d" not in done.stdout


def test_relative_imports_and_subpackages_are_resolved(tmp_path):
    package = write_package(tmp_path, {
        "sub/__init__.py": "from .leaf import value\n",
        "sub/leaf.py": "from ..top import value\n",
        "top.py": "from .sub import leaf\nvalue = 1\n",
    })
    done = check(package)
    assert done.returncode == 1
    assert "import circle: pkg.sub.leaf -> pkg.top -> pkg.sub.leaf" in done.stdout


def test_a_package_without_circles_passes(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "import os\nfrom pkg import b\n",
        "b.py": "from pkg.c import x\n",
        "c.py": "x = 1\n",
        "sub/__init__.py": "from pkg.sub import leaf\n",  # a package importing its own submodule: no circle
        "sub/leaf.py": "from pkg.sub.other import y\n",
        "sub/other.py": "y = 2\n",
    })
    done = check(package)
    assert done.returncode == 0, done.stdout
    assert done.stdout.strip() == "no import circles in pkg/ (7 modules), nor between its 4 parts"


def test_longext_has_no_import_circle():
    done = check(SCRIPT.parents[1] / "longext")
    assert done.returncode == 0, done.stdout


def test_two_subpackages_that_import_each_other_through_different_modules_are_a_parts_circle(tmp_path):
    package = write_package(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from pkg.high.b import g\n    return g\n",  # up, lazily
        "low/c.py": "value = 1\n",
        "high/__init__.py": "",
        "high/b.py": "from pkg.low.c import value\ng = value\n",  # down
        "top.py": "from pkg.high.b import g\n",
    })
    done = check(package)
    assert done.returncode == 1, done.stdout
    assert "no import circles in pkg/" not in done.stdout and "import circle:" not in done.stdout  # no module circle
    assert "parts circle: pkg.high -> pkg.low -> pkg.high" in done.stdout
    assert "  pkg.high.b imports pkg.low.c" in done.stdout and "  pkg.low.a imports pkg.high.b" in done.stdout


def test_parts_that_import_downwards_only_pass(tmp_path):
    package = write_package(tmp_path, {
        "low/__init__.py": "", "low/c.py": "value = 1\n",
        "high/__init__.py": "", "high/b.py": "from pkg.low.c import value\n",
        "top.py": "from pkg.high.b import value\nfrom pkg.low import c\n",
    })
    done = check(package)
    assert done.returncode == 0, done.stdout
    assert "nor between its 3 parts" in done.stdout
