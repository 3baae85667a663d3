"""A run directory on any pyarrow filesystem (a local path or a URI such as ``s3://bucket/run``): the one place that
writes artifacts.

Every write goes to a temporary name and is then moved into place, so a reader (or a resumed
driver) never sees half a file; what a library writes to a path of its own (``torch.save`` of a folder, an ONNX or
TorchScript file) goes through ``write_file``/``write_folder``, which hand it a temporary path. Files and folders get
the modes a plain ``open``/``mkdir`` would give under the umask. ``write_json(path, data)`` is ``RunDir.write_json``
for one local file. (Core: pyarrow only, no Ray.)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import GeopruneError



class RunDir:
    def __init__(self, location: str):
        self.remote = "://" in location
        try:
            if self.remote:
                self.fs, self.root = pafs.FileSystem.from_uri(location)
            else:
                self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
        except (pa.ArrowInvalid, OSError) as exc:
            raise GeopruneError(f"cannot use storage {location}: {exc}", "pass a local path or a pyarrow URI") from None
        self.location = location.rstrip("/") if self.remote else self.root
        if not self.remote:
            for parent in [Path(self.root), *Path(self.root).parents]:
                if parent.exists() and not parent.is_dir():
                    raise GeopruneError(f"storage {location}: {parent} is a file, not a folder",
                                        "pass a folder path for --storage")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        """What Ray Tune/Train take as ``storage_path`` for a subfolder."""
        return f"{self.location}/{name}"

    def exists(self, name: str) -> bool:
        """Whether ``name`` is in the run directory (which need not exist yet)."""
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.root, recursive=True)
        folder, _, base = name.rpartition("/")
        if folder:
            self.fs.create_dir(self.path(folder), recursive=True)
        tmp = self.path(f"{folder + '/' if folder else ''}.{uuid.uuid4().hex[:8]}.{base}.tmp")
        try:
            self._write_stream(tmp, data)
            self.fs.move(tmp, self.path(name))
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise

    def _write_stream(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_json(self, name: str, data: Any) -> None:
        self.write_bytes(name, (json.dumps(data, indent=2, default=_plain) + "\n").encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_table(self, name: str, rows: list[dict[str, Any]], schema: Optional[pa.Schema] = None) -> None:
        table = pa.Table.from_pylist(rows, schema=schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(name, buffer.getvalue())

    def read_table(self, name: str) -> list[dict[str, Any]]:
        return pq.read_table(io.BytesIO(self.read_bytes(name))).to_pylist()

    def list(self, name: str) -> list[str]:
        """The names directly inside the folder ``name`` (none if it does not exist)."""
        selector = pafs.FileSelector(self.path(name), allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector)]

    def delete(self, name: str) -> None:
        """Remove the folder ``name`` and what it holds (nothing if it does not exist)."""
        if self.exists(name):
            self.fs.delete_dir(self.path(name))

    def write_file(self, name: str, write: Callable[[str], Any]) -> Any:
        """``write(path)`` writes a file at a temporary local path (a library that only writes to paths); it is then
        moved into place as ``name``: all of it or nothing. Returns what ``write`` returned."""
        folder, _, base = name.rpartition("/")
        local = Path(self.path(folder)) if not self.remote else None
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=local)
        os.close(fd)
        try:
            result = write(tmp)
            honour_umask(tmp)  # mkstemp's 0600 → what open() would give
            if local is not None:
                os.replace(tmp, local / base)
            else:
                self.write_bytes(name, Path(tmp).read_bytes())
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return result

    def write_folder(self, name: str, write: Callable[[Path], Any]) -> Any:
        """``write(folder)`` fills a temporary local folder; it then replaces ``name`` (all of it or nothing)."""
        parent = Path(self.path(name)).parent if not self.remote else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name.rpartition('/')[2]}.", suffix=".tmp", dir=parent))
        try:
            result = write(staging)
            honour_umask(staging, directory=True)
            if parent is not None:
                target = Path(self.path(name))
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging, target)
            else:
                self.put_folder(staging, name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result

    def put_folder(self, local: Path, name: str) -> None:
        """Copy a local folder in as ``name``, replacing what was there, in one final move."""
        staging = self.path(f".{uuid.uuid4().hex[:8]}.{name}.tmp")
        self.fs.create_dir(staging, recursive=True)
        pafs.copy_files(str(local), staging, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        if self.exists(name):
            self.fs.delete_dir(self.path(name))
        self.fs.move(staging, self.path(name))


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON to a local path atomically (a reader never sees half a file): ``RunDir.write_json`` of its folder."""
    RunDir(str(Path(path).parent)).write_json(Path(path).name, data)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def current_umask() -> int:
    """The process's umask: read from /proc on Linux (no change to it), else set and put back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, directory: bool = False) -> None:
    """Give a ``mkstemp`` file or ``mkdtemp`` folder (0600/0700) the mode a plain ``open``/``mkdir`` would give."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
