"""The run directory, the one place that writes artifacts: all of a file or folder or nothing, the umask's modes, on
a local path and through a URI (``file://``: the branch a remote store such as s3:// takes)."""

import os

import pytest

from geoprune_ray.core.rundir import RunDir


@pytest.fixture(params=["path", "uri"])
def run(request, tmp_path):
    old = os.umask(0o022)
    yield RunDir(str(tmp_path / "run") if request.param == "path" else f"file://{tmp_path}/run"), tmp_path / "run"
    os.umask(old)


def test_a_file_written_by_a_library_lands_whole_with_the_umasks_mode(run):
    rundir, folder = run
    def write(path):
        with open(path, "wb") as f:
            return f.write(b"abc")

    assert rundir.write_file("export/model.bin", write) == 3
    assert (folder / "export" / "model.bin").read_bytes() == b"abc"
    assert oct((folder / "export" / "model.bin").stat().st_mode & 0o777) == "0o644"
    def broken(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("the disk filled up")

    with pytest.raises(RuntimeError):  # a writer that fails leaves nothing, not even its temporary file
        rundir.write_file("export/broken.bin", broken)
    assert sorted(p.name for p in (folder / "export").iterdir()) == ["model.bin"]


def test_a_folder_replaces_the_old_one_whole(run):
    rundir, folder = run
    rundir.write_folder("model", lambda staging: (staging / "a.txt").write_text("1"))
    rundir.write_folder("model", lambda staging: (staging / "b.txt").write_text("2"))
    assert sorted(p.name for p in (folder / "model").iterdir()) == ["b.txt"]
    assert oct((folder / "model").stat().st_mode & 0o777) == "0o755"
    assert oct((folder / "model" / "b.txt").stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in folder.iterdir()) == ["model"]  # no staging folder left
