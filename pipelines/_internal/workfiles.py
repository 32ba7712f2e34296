"""Work files: what a stage keeps across its attempts, and across nodes, before its artifact
is committed (synthetic-set checkpoints, finished experts).

They live in the stage's work location, ``ctx.work_uri``: the work directory itself on a
local store (one every node shares, on a cluster), ``<store>/_work/<kind>/<key>/`` on an
``s3://`` store, where a retry on another node finds them. Each file is put whole (a
rename on a filesystem, one object put on S3), so a reader sees all of it or nothing.
``gc`` removes the work location once the artifact is committed; ``--force`` clears it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

from .shards import _filesystem


@dataclass(frozen=True)
class WorkFiles:
    uri: str        # the work location: an absolute path, or a URI of the store's filesystem
    local_dir: str  # this node's directory for the work (local copies of remote files)

    @property
    def remote(self) -> bool:
        return "://" in self.uri

    def _where(self, rel: str):
        """The filesystem of the work location, and ``rel``'s path on it."""
        fs, base, _ = _filesystem(self.uri)
        return fs, f"{base}/{rel}"

    def exists(self, rel: str) -> bool:
        import pyarrow.fs
        fs, path = self._where(rel)
        return fs.get_file_info(path).type == pyarrow.fs.FileType.File

    def new_file(self, rel: str) -> str:
        """A fresh local path to write ``rel`` to, then hand to ``put``."""
        if self.remote:
            d = tempfile.mkdtemp(prefix="distill-work-")
        else:
            d = os.path.dirname(self._where(rel)[1])  # same filesystem: put is a rename
            os.makedirs(d, exist_ok=True)
        return os.path.join(d, f".{os.path.basename(rel)}.{uuid.uuid4().hex[:8]}.tmp")

    def put(self, rel: str, local: str) -> None:
        """Make the finished local file ``local`` the work file ``rel`` (``local`` is
        consumed)."""
        fs, path = self._where(rel)
        if not self.remote:
            os.replace(local, path)
            return
        try:
            with open(local, "rb") as f, fs.open_output_stream(path) as out:
                shutil.copyfileobj(f, out, 1 << 22)
        finally:
            os.remove(local)
            try:
                os.rmdir(os.path.dirname(local))
            except OSError:
                pass

    def get(self, rel: str) -> str | None:
        """A local path holding the work file ``rel``, or None if there is none. A remote
        file is downloaded every time (a cached copy could be of a replaced artifact)."""
        fs, path = self._where(rel)
        if not self.remote:
            return path if os.path.isfile(path) else None
        dst = os.path.join(self.local_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.{uuid.uuid4().hex[:8]}.part"
        try:
            with fs.open_input_stream(path) as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 22)
        except FileNotFoundError:
            return None
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, dst)
        return dst
