"""The persist-dir manifest names compressors so that a persist dir survives a new virtualenv or machine."""

from __future__ import annotations

from lloco_index import defaults
from lloco_index.manifest import compressor_ref, resolve_compressor_ref


def test_shipped_compressor_is_recorded_by_name(tmp_path):
    shipped = defaults.default_compressor_dir()
    assert compressor_ref(shipped, tmp_path) == f"shipped:{shipped.name}"
    assert resolve_compressor_ref(f"shipped:{shipped.name}", tmp_path) == shipped


def test_compressor_inside_the_persist_dir_is_relative_others_absolute(tmp_path):
    inside = tmp_path / "storage" / "lloco_compressor"
    inside.mkdir(parents=True)
    assert compressor_ref(inside, tmp_path / "storage") == "lloco_compressor"
    assert resolve_compressor_ref("lloco_compressor", tmp_path / "other") == tmp_path / "other" / "lloco_compressor"
    outside = tmp_path / "runs" / "c"
    outside.mkdir(parents=True)
    assert compressor_ref(outside, tmp_path / "storage") == str(outside.resolve())
    assert resolve_compressor_ref(str(outside), tmp_path / "storage") == outside


def test_old_absolute_record_of_the_shipped_compressor_still_opens(tmp_path):
    # Written by an earlier version from a virtualenv that no longer exists.
    shipped = defaults.default_compressor_dir()
    old = f"/gone/venv/lib/python3.11/site-packages/lloco_index/pretrained/{shipped.name}"
    assert resolve_compressor_ref(old, tmp_path) == shipped
    # An absolute path that still exists, or that is not a shipped compressor, is kept as written.
    assert resolve_compressor_ref("/gone/runs/my-compressor", tmp_path).as_posix() == "/gone/runs/my-compressor"
