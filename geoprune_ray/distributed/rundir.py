"""A run directory on any pyarrow filesystem (a local path or a URI such as ``s3://bucket/run``).

Every write goes to a temporary name and is then moved into place, so a reader (or a resumed
driver) never sees half a file.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import GeopruneError

if TYPE_CHECKING:
    from .guard import RunLock


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

    def lock(self) -> "RunLock":
        """This driver's exclusive hold on the run directory (``guard.RunLock``), until ``release``."""
        from .guard import RunLock

        return RunLock(self.location, None if self.remote else self.root).acquire()

    def put_folder(self, local: Path, name: str) -> None:
        """Copy a local folder in as ``name``, replacing what was there, in one final move."""
        staging = self.path(f".{uuid.uuid4().hex[:8]}.{name}.tmp")
        self.fs.create_dir(staging, recursive=True)
        pafs.copy_files(str(local), staging, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        if self.exists(name):
            self.fs.delete_dir(self.path(name))
        self.fs.move(staging, self.path(name))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
