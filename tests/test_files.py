"""longext/files.py: the one atomic writer (files and folders), path expansion and the cache folder."""

from __future__ import annotations

import os
import stat

import pytest

from longext.files import cache_dir, expand_path, publish_folder, staging_folder, write_atomic, write_json


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_atomic_replaces_the_file_with_plain_permissions_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "status.json"
    write_json(path, {"step": 1})
    write_atomic(path, '{"step": 2}\n')
    assert path.read_text() == '{"step": 2}\n'
    write_atomic(tmp_path / "plot.png", b"\x89PNG")
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert hidden(path.parent) == [] and hidden(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_atomic(path, 12)  # neither text nor bytes: fails after the temp file exists
    assert path.read_text() == "old\n" and hidden(tmp_path) == []


def test_publish_folder_replaces_keeps_the_previous_one_or_rolls_back(tmp_path):
    final = tmp_path / "adapter"
    with staging_folder(final) as tmp:
        (tmp / "weights").write_text("1")
        assert publish_folder(tmp, final) is False
    assert (final / "weights").read_text() == "1" and hidden(tmp_path) == []

    with staging_folder(final) as tmp:
        (tmp / "weights").write_text("2")
        assert publish_folder(tmp, final, previous=tmp_path / "adapter-tuned") is True
    assert (final / "weights").read_text() == "2"
    assert (tmp_path / "adapter-tuned" / "weights").read_text() == "1" and hidden(tmp_path) == []

    with pytest.raises(OSError):
        publish_folder(tmp_path / "missing", final)  # the rename fails: the old folder goes back in place
    assert (final / "weights").read_text() == "2" and hidden(tmp_path) == []


def test_a_published_folder_follows_the_umask_whatever_its_writers_chose(tmp_path):
    # safetensors writes its weight files 0600: in a published folder they read like every other file
    from longext.files import umask

    final = tmp_path / "model"
    with staging_folder(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "model.safetensors", 0o600)
        os.chmod(tmp / "sub" / "run.sh", 0o700)
        os.symlink("model.safetensors", tmp / "link")
        publish_folder(tmp, final)
    mode = lambda p: stat.S_IMODE(os.lstat(p).st_mode)  # noqa: E731
    assert mode(final / "model.safetensors") == 0o666 & ~umask()
    assert mode(final / "sub") == mode(final) == 0o777 & ~umask()
    assert mode(final / "sub" / "run.sh") == 0o777 & ~umask()  # an executable stays one
    assert os.readlink(final / "link") == "model.safetensors"


def test_an_unpublished_staging_folder_is_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_folder(tmp_path / "out") as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("export check failed")
    assert list(tmp_path.iterdir()) == []


def test_paths_expand_the_cache_and_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "cache"
    assert expand_path("${LONGEXT_CACHE}/models/x") == f"{tmp_path}/cache/models/x"
    assert expand_path("$LONGEXT_CACHE/books") == f"{tmp_path}/cache/books"
    assert expand_path("~/data") == f"{tmp_path}/home/data"
    monkeypatch.delenv("LONGEXT_CACHE")
    assert cache_dir() == tmp_path / "home" / ".cache" / "longext"
