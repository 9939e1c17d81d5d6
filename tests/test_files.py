"""Outputs are written whole or not at all, and as readable as any file the user creates."""

from __future__ import annotations

import os
import stat

import pytest

from geoagent.files import write_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("content", [b"bytes", "text \u00e9", lambda fh: fh.write("written")])
def test_an_output_gets_the_permissions_the_umask_gives_new_files(tmp_path, umask_022, content):
    """A report, map or CSV shared with colleagues must not come out private (mkstemp's 0600 did)."""
    target = write_atomic(tmp_path / "report.html", content)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    """A crash while writing keeps what was there, whole, and leaves nothing beside it."""
    target = tmp_path / "predictions.csv"
    target.write_text("old")

    def explode(fh):
        fh.write("half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_atomic(target, explode)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]
