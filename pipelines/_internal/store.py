"""The artifact store: ``<root>/<kind>/<key>/`` with ``manifest.json`` as commit marker.

A stage writes its outputs into a private staging directory; the core then writes the
manifest into it (last) and renames the whole directory to its final place. A rename of a
directory onto a non-empty one fails, so when two runs produce the same key at once
exactly one commit wins and the other adopts it. Anything without a committed manifest
does not exist: it is never a cache hit, and ``gc`` removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass

from ..errors import UserError
from .fetch import sha256_of

MANIFEST = "manifest.json"
_SPECIAL = ("_staging", "_work", "_runs", "_trash", "mlflow")


@dataclass(frozen=True)
class Store:
    root: str

    @classmethod
    def open(cls, uri: str | os.PathLike, create: bool = True) -> "Store":
        """A local store at a path (or ``file://`` URI), or a remote one at an object-store
        URI (``remote_store.SCHEMES``)."""
        uri = str(uri)
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        if "://" in uri:
            from .remote_store import RemoteStore
            store = RemoteStore(uri)
            store.check(create)
            return store
        root = os.path.abspath(os.path.expanduser(uri))
        if create:
            check_writable(root)
        return cls(root)

    # -- paths ------------------------------------------------------------------------
    def artifact_dir(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, key)

    def work_dir(self, kind: str, key: str) -> str:
        return os.path.join(self.root, "_work", kind, key)

    def work_uri(self, kind: str, key: str) -> str:
        """The work directory as every node reaches it."""
        return self.work_dir(kind, key)

    def clear_work(self, kind: str, key: str) -> None:
        shutil.rmtree(self.work_dir(kind, key), ignore_errors=True)

    def train_storage(self, kind: str, key: str) -> str:
        """Ray Train's ``storage_path`` for the checkpoints of a stage."""
        return os.path.join(self.work_dir(kind, key), "ray_train")

    def sweep_storage(self) -> str:
        return os.path.join(self.root, "_work", "_sweeps")

    def remote_staging(self, kind: str, key: str, staging: str) -> str | None:
        return None  # datasets are written into the staging directory itself

    def abandon(self, kind: str, key: str, staging: str) -> None:
        """Remove what a failed attempt staged."""
        shutil.rmtree(staging, ignore_errors=True)

    def new_staging_dir(self, kind: str, key: str) -> str:
        tag = f"{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        path = os.path.join(self.root, "_staging", kind, tag)
        os.makedirs(path)
        return path

    def runs_dir(self) -> str:
        return os.path.join(self.root, "_runs")

    # -- reading -----------------------------------------------------------------------
    def manifest(self, kind: str, key: str) -> dict | None:
        """The committed manifest of an artifact, or None if it is not committed."""
        path = os.path.join(self.artifact_dir(kind, key), MANIFEST)
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return None  # a torn or unreadable manifest is not a commit

    def is_committed(self, kind: str, key: str) -> bool:
        return self.manifest(kind, key) is not None

    def manifests(self) -> list[dict]:
        """Every committed manifest in the store."""
        out = []
        for kind in self.kinds():
            for key in sorted(os.listdir(os.path.join(self.root, kind))):
                m = self.manifest(kind, key)
                if m is not None:
                    out.append(m)
        return out

    def kinds(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(d for d in os.listdir(self.root)
                      if not d.startswith(_SPECIAL) and os.path.isdir(os.path.join(self.root, d)))

    def find(self, key_prefix: str) -> list[dict]:
        return [m for m in self.manifests() if m["key"].startswith(key_prefix)]

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def open_input(self, manifest: dict, output: str):
        """Output ``output`` of a committed artifact, as the artifact type it was written:
        its files are checked against the manifest where they are used (``fetch``)."""
        from ..artifacts import ARTIFACT_TYPES
        from .fetch import Committed
        entry = manifest["outputs"][output]
        return ARTIFACT_TYPES[entry["type"]].committed(Committed.of(self.root, manifest, output))

    def local_files(self, manifest: dict, rels: list[str]) -> list[str]:
        root = self.artifact_dir(manifest["kind"], manifest["key"])
        return [os.path.join(root, rel) for rel in rels]

    def describe(self, kind: str, key: str, staging: str, outputs: dict) -> dict:
        """The manifest entries of a stage's outputs, all in ``staging``."""
        return {out: describe_output(a.path, type(a).type_name, staging, a.info)
                for out, a in outputs.items()}

    # -- committing ------------------------------------------------------------------
    def commit(self, staging: str, manifest: dict, replace: bool = False) -> dict:
        """Write ``manifest`` last into ``staging`` and move it to its final place.

        Returns the manifest that is committed afterwards: ours, or, if another run
        committed the same key first, theirs. ``replace`` (``--force``) swaps out a
        committed artifact of the same key."""
        kind, key = manifest["kind"], manifest["key"]
        write_json_atomic(os.path.join(staging, MANIFEST), manifest)
        final = self.artifact_dir(kind, key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        for _ in range(3):
            try:
                os.rename(staging, final)  # atomic; fails if ``final`` is a non-empty dir
                return manifest
            except OSError:
                pass
            winner = self.manifest(kind, key)
            if winner is not None and not replace:  # another run committed it first
                shutil.rmtree(staging, ignore_errors=True)
                return winner
            self._discard(final)  # debris of a killed run, or replaced by --force
        raise OSError(f"cannot commit {kind}/{key}: {final} keeps reappearing")

    def uncommit(self, kind: str, key: str) -> None:
        """Remove a committed artifact: its manifest first (from then on it does not
        exist), then its files."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.artifact_dir(kind, key), MANIFEST))
        self._discard(self.artifact_dir(kind, key))

    def _discard(self, path: str) -> None:
        trash = os.path.join(self.root, "_trash", uuid.uuid4().hex)
        os.makedirs(os.path.dirname(trash), exist_ok=True)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # -- run records -------------------------------------------------------------------
    def write_run(self, record: dict) -> str:
        path = os.path.join(self.runs_dir(), f"{record['run_id']}.json")
        write_json_atomic(path, record)
        return path

    def runs(self) -> list[dict]:
        """Run records, oldest first."""
        d = self.runs_dir()
        if not os.path.isdir(d):
            return []
        out = []
        for f in os.listdir(d):
            if f.endswith(".json"):
                try:
                    with open(os.path.join(d, f)) as fh:
                        out.append(json.load(fh))
                except (OSError, json.JSONDecodeError):
                    continue
        return sorted(out, key=lambda r: r.get("started", 0))

    def last_run(self, pipeline: str) -> dict | None:
        runs = [r for r in self.runs() if r.get("pipeline") == pipeline]
        return runs[-1] if runs else None


def check_writable(root: str) -> None:
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".probe-{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--store: store path {root!r} is not writable ({e.strerror or e}); "
                        f"allowed: a directory you can create and write") from None


def write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe_output(path: str, type_name: str, root: str, info: dict) -> dict:
    """The manifest entry of the output at ``path`` (a directory under ``root``)."""
    import pyarrow.parquet as pq
    files = []
    for dirpath, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            files.append((os.path.relpath(full, path), *sha256_of(full)))
    return output_entry(os.path.relpath(path, root), files, type_name, info,
                        lambda rel: pq.ParquetFile(os.path.join(path, rel)))


def output_entry(rel_dir: str, files: list[tuple[str, int, str]], type_name: str, info: dict,
                 open_parquet) -> dict:
    """The manifest entry of one output: its files (path, bytes, sha256) and a checksum
    over them, and for datasets the schema and row count from the parquet footers
    (``open_parquet(path)``: a ``pyarrow.parquet.ParquetFile``)."""
    digest = hashlib.sha256()
    for rel, _, sha in files:
        digest.update(f"{rel}:{sha}\n".encode())
    entry = {"type": type_name, "path": rel_dir, "bytes": sum(f[1] for f in files),
             "files": [{"path": rel, "bytes": size, "sha256": sha} for rel, size, sha in files],
             "checksum": digest.hexdigest(), "info": info}
    if type_name == "dataset":
        parquet = [open_parquet(rel) for rel, _, _ in files if rel.endswith(".parquet")]
        entry["rows"] = sum(p.metadata.num_rows for p in parquet)
        entry["schema"] = (str(parquet[0].schema_arrow).split("\n-- schema metadata")[0]
                           if parquet else "")
    return entry
