"""The session check of tests/conftest.py (``repository_left_as_found``): what it sees of a tree and what it names."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import tree_changes, tree_snapshot


def test_added_removed_and_changed_files_are_named_and_tool_folders_are_not_watched(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "kept.py").write_text("a")
    (tmp_path / "pkg" / "gone.py").write_text("b")
    (tmp_path / "pkg" / "touched.py").write_text("c")
    before = tree_snapshot(tmp_path)
    assert before.keys() == {"pkg/", "pkg/kept.py", "pkg/gone.py", "pkg/touched.py"}

    (tmp_path / "sym_shape_infer_temp.onnx").write_bytes(b"scratch")
    (tmp_path / "runs").mkdir()
    (tmp_path / "pkg" / "gone.py").unlink()
    stat = (tmp_path / "pkg" / "touched.py").stat()
    os.utime(tmp_path / "pkg" / "touched.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same size, new time
    for tool in (".ci-venv/bin", "pkg/__pycache__", ".pytest_cache", ".hypothesis/examples", "x.egg-info", ".git"):
        (tmp_path / tool).mkdir(parents=True, exist_ok=True)
        (tmp_path / tool / "written").write_text("by a tool")
    assert tree_changes(before, tree_snapshot(tmp_path)) == [
        "removed pkg/gone.py", "changed pkg/touched.py", "added runs/", "added sym_shape_infer_temp.onnx",
    ]

