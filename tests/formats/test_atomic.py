"""write_file, write_folder: the output appears complete or not at all, even after an error or Ctrl-C."""
import os

import pytest

from prunekit.formats.atomic import check_output, write_file, write_folder


def write_two(folder):
    for name in ("a.txt", "b.txt"):
        with open(os.path.join(folder, name), "w") as f:
            f.write(name)


def test_writes_then_moves_into_place_with_the_umask_mode(tmp_path):
    out = tmp_path / "sub" / "out"
    assert write_folder(str(out), write_two) == ["a.txt", "b.txt"]
    assert sorted(os.listdir(out)) == ["a.txt", "b.txt"] and os.listdir(tmp_path / "sub") == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's 0700


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path, error):
    def fail(folder):
        write_two(folder)
        raise error

    with pytest.raises(error):
        write_folder(str(tmp_path / "out"), fail)
    assert os.listdir(tmp_path) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(error):
        write_folder(str(tmp_path / "out"), fail, overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["keep.txt"]


def test_an_existing_folder_is_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="output.dir .* already exists; pass --overwrite"):
        write_folder(str(tmp_path / "out"), write_two)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    write_folder(str(tmp_path / "out"), write_two, overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["a.txt", "b.txt"] and os.listdir(tmp_path) == ["out"]


def test_a_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"

    def racing(folder):
        write_two(folder)
        out.mkdir()  # another process wrote it while we worked

    with pytest.raises(FileExistsError, match="already exists"):
        write_folder(str(out), racing)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == []


def test_a_file_is_never_an_output_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        check_output(str(tmp_path / "f"), overwrite=True)


def test_write_file_writes_chunks_with_the_umask_mode(tmp_path):
    f = tmp_path / "m.bin"
    write_file(f, [b"ab", memoryview(b"cd")])
    assert f.read_bytes() == b"abcd" and os.listdir(tmp_path) == ["m.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(f).st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600
    write_file(f, b"new")
    assert f.read_bytes() == b"new"


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    f = tmp_path / "m.bin"
    f.write_bytes(b"old")

    def chunks():
        yield b"half"
        raise error

    with pytest.raises(error):
        write_file(f, chunks())
    assert f.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.bin"]
    with pytest.raises(OSError):
        write_file(tmp_path / "no_such_dir" / "m.bin", b"x")
    assert os.listdir(tmp_path) == ["m.bin"]
