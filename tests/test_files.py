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


def test_a_link_is_written_through_and_modes_are_kept(tmp_path):
    """write_output replaced a symlink by a file (its target kept the old text) and gave a
    0o600 file back as 0o644, where open(path, "w") had written through and kept both."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "runs.csv").write_text("old")
    os.chmod(real / "runs.csv", 0o600)
    link = tmp_path / "runs.csv"
    link.symlink_to(real / "runs.csv")
    write_output(str(link), lambda fh: fh.write("new"))
    assert link.is_symlink() and (real / "runs.csv").read_text() == "new"
    assert ((real / "runs.csv").stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(real)) == ["runs.csv"]


def test_only_regular_files_are_replaced(tmp_path):
    (tmp_path / "table.md").mkdir()
    with pytest.raises(einc.EincError, match="table.md: not a regular file"):
        write_output(str(tmp_path / "table.md"), lambda fh: fh.write("x"))
    assert (tmp_path / "table.md").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only file")
def test_a_read_only_file_is_refused_as_open_would(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    os.chmod(path, 0o444)
    with pytest.raises(einc.EincError, match="Permission denied"):
        write_output(str(path), lambda fh: fh.write("new"))
    assert path.read_text() == "old"


def test_a_killed_writer_s_temporaries_are_swept(tmp_path):
    """SIGTERM or SIGKILL mid-write runs no cleanup: the next run's folder check removes the
    temporary files replace_file names, and nothing else."""
    from einc.files import sweep_temporaries
    left = tmp_path / ".runs.csv.0123456789abcdef.tmp"
    left.write_text("half")
    keep = [tmp_path / ".hidden.tmp", tmp_path / "notes.0123456789abcdef.tmp", tmp_path / "runs.csv"]
    for p in keep:
        p.write_text("x")
    sweep_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in keep)
