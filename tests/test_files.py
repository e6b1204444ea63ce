import os

import pytest

import einc
from einc.files import replace_file, write_output


def _left(folder):
    return sorted(os.listdir(folder))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("old\n")

    def half(fh):  # a full disk halfway through
        fh.write("new rows")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_file(str(path), half)
    assert path.read_text() == "old\n" and _left(tmp_path) == ["runs.csv"]
    with pytest.raises(einc.EincError, match=f"cannot write {path}: No space left on device"):
        write_output(str(path), half)
    assert path.read_text() == "old\n" and _left(tmp_path) == ["runs.csv"]


def test_a_failed_new_file_is_not_created(tmp_path):
    def boom(fh):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_file(str(tmp_path / "x.json"), boom)
    assert _left(tmp_path) == []


def test_writes_replace_and_keep_the_requested_mode(tmp_path):
    path = tmp_path / "a.png"
    replace_file(str(path), lambda fh: fh.write(b"\x89PNG"), binary=True, mode=0o640)
    assert path.read_bytes() == b"\x89PNG" and (path.stat().st_mode & 0o777) == 0o640
    write_output(str(path), lambda fh: fh.write(b"2"), binary=True)
    assert path.read_bytes() == b"2" and _left(tmp_path) == ["a.png"]
