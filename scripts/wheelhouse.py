"""`make wheelhouse`: every wheel longext needs beyond torch, for another machine's Python and platform, in one folder
that installs with no index (`pip install --no-index --find-links wheelhouse -e .`). See docs/gpu.md.

    python scripts/wheelhouse.py --out wheelhouse --python-version 3.12 [--glibc 2.28] [--skip numpy pyarrow ...]

1. DeepSpeed has no wheel on PyPI: its sdist is built here into a pure-Python wheel with no prebuilt ops
   (DS_BUILD_OPS=0; the node JIT-compiles fused Adam on first use, which needs nvcc and ninja). The build imports
   torch, so run this with a Python that has torch (the project's .venv).
2. The dependency closure of longext (pyproject's dependencies, the `test` extra for the gpu tier, setuptools for the
   editable install) is resolved by pip for the target (`pip install --dry-run --report`), with the versions of
   requirements.txt as constraints. torch stands in as a stub wheel without dependencies: the node's own CUDA torch is
   used, and what only torch needs (nvidia-*, triton, sympy, networkx, jinja2) is assumed to come with it. Packages
   torch shares with others (filelock, fsspec, typing-extensions) are in the wheelhouse.
3. Every resolved wheel is downloaded for the target platform (--skip leaves out packages the node's image already has
   in a version that satisfies longext), and the sizes are printed, largest first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_MB = 60
STUB = "torch"


def main() -> int:
    args = _parse()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # two versions of one package would stop the install
        old.unlink()
    pins = _pins(ROOT / "requirements.txt")
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        tmp = Path(tmp)
        build_deepspeed(pins["deepspeed"], out, tmp)
        stub = torch_stub(tmp / "stub", pins.get("torch", "2.13.0"))
        report = resolve(roots(), pins, stub, out, args, tmp)
    wanted = [(item["metadata"]["name"], item["metadata"]["version"]) for item in report["install"]]
    skip = {_norm(s) for s in [STUB, *args.skip]}
    download([(n, v) for n, v in wanted if _norm(n) not in skip and _norm(n) != "deepspeed"], out, args)
    return print_sizes(out)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "wheelhouse")
    p.add_argument("--python-version", default="3.12", help="Target CPython, e.g. 3.12")
    p.add_argument("--glibc", default="2.28", help="Target glibc: manylinux wheels up to this one are taken")
    p.add_argument("--arch", default="x86_64")
    p.add_argument("--skip", nargs="*", default=[], help="Packages the node already has (not downloaded)")
    return p.parse_args()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    """name -> version of requirements.txt's `name==version` lines (normalized names)."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#;]+)", path.read_text(), flags=re.M)
    return {_norm(n): v for n, v in found}


def roots() -> list[str]:
    """longext's own requirements from pyproject.toml: dependencies + the test extra + its build backend."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["test"]
    return [d for d in deps if _norm(re.split(r"[<>=!~;\[ ]", d)[0]) != STUB] + project["build-system"]["requires"]


def pip(*args: str, env: dict | None = None) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"wheelhouse: `pip {args[0]}` failed (exit {done.returncode})")


def build_deepspeed(version: str, out: Path, tmp: Path) -> None:
    """deepspeed-<version>-py3-none-any.whl from the sdist: pure Python, ops JIT-built on first use on the node."""
    print(f"building deepspeed {version} (pure Python, no prebuilt ops) from its sdist ...", flush=True)
    pip("download", "--no-deps", "--no-binary", ":all:", f"deepspeed=={version}", "-d", str(tmp / "sdist"))
    sdist = next((tmp / "sdist").glob("deepspeed-*.tar.gz"))
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(sdist), env=env)


def torch_stub(folder: Path, version: str) -> Path:
    """A wheel named torch with no dependencies and no code: stands in for the node's torch in the resolution only."""
    folder.mkdir(parents=True)
    version = version.split("+")[0] + "+wheelhouse.stub"
    path = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: longext\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def target_flags(args) -> list[str]:
    """pip's target options: CPython X.Y and every manylinux tag up to --glibc (pip matches each tag exactly)."""
    major, minor = args.python_version.split(".")[:2]
    glibc_minor = int(args.glibc.split(".")[1])
    platforms = [f"manylinux_2_{n}_{args.arch}" for n in range(glibc_minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    platforms += [f"{name}_{args.arch}" for n, name in legacy.items() if n <= glibc_minor]
    flags = ["--only-binary=:all:", "--python-version", f"{major}.{minor}", "--implementation", "cp",
             "--abi", f"cp{major}{minor}"]
    for platform in platforms:
        flags += ["--platform", platform]
    return flags


def resolve(requirements: list[str], pins: dict, stub: Path, wheels: Path, args, tmp: Path) -> dict:
    print(f"resolving for CPython {args.python_version}, manylinux glibc <= {args.glibc} ({args.arch}) ...", flush=True)
    constraints = tmp / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if n != STUB))
    report = tmp / "report.json"
    pip("install", "--dry-run", "--ignore-installed", "--quiet", "--target", str(tmp / "never"), "--report", str(report),
        *target_flags(args), "--find-links", str(wheels), "-c", str(constraints), str(stub), *requirements)
    return json.loads(report.read_text())


def download(wanted: list[tuple[str, str]], out: Path, args) -> None:
    print(f"downloading {len(wanted)} wheels ...", flush=True)
    pip("download", "--no-deps", *target_flags(args), "-d", str(out), *[f"{n}=={v}" for n, v in wanted])


def print_sizes(out: Path) -> int:
    wheels = sorted(out.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    total = sum(p.stat().st_size for p in wheels)
    for p in wheels:
        print(f"{p.stat().st_size / 1e6:8.2f} MB  {p.name}")
    print(f"{total / 1e6:8.2f} MB  in {len(wheels)} wheels: {out}")
    if total > BUDGET_MB * 1e6:
        print(f"note: over the {BUDGET_MB} MB aim; the largest wheels above are what the node's image may already have "
              f"(--skip NAME leaves them out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
