"""The artifact store on S3 (or an S3-compatible server): ``s3://bucket/prefix``.

The layout mirrors the local store, with one difference: object storage has no rename, so
an artifact's files are uploaded under a prefix of their own, ``<kind>/<key>/<tag>/``, and
the artifact is committed by writing ``<kind>/<key>/manifest.json`` with a conditional put
(``If-None-Match: *``). Exactly one run's put succeeds; a run that loses deletes its
upload and adopts the winner's manifest, which names the tag it committed (``data``).
Files under a tag that no manifest names do not exist: never read, and ``gc`` removes them.

Stages read and write local paths (``save_pretrained``, parquet), so:

- outputs go to a local staging directory on the stage's node and are uploaded at commit,
  except parquet written by Ray Data (``ctx.write_dataset`` of a ``ray.data.Dataset``),
  which its write tasks, on whichever nodes they run, put straight under the tag;
- inputs are fetched on the node that uses them, each file checked against the sha256
  its manifest lists (``fetch``): a model or report is downloaded into that node's cache;
  a dataset keeps its ``s3://`` URI, so Ray Data reads it from the store on any node;
- Ray Train checkpoints go to ``<prefix>/_work/<kind>/<key>/ray_train``.

Credentials, region and endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for MinIO, Ceph or
moto), read by pyarrow (every data read and write) and boto3 (the conditional put).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from functools import cached_property

from .fetch import cache_root, download, sha256_of
from .s3 import SCHEMES, after_conditional_put, check_usable, parse_uri, put

__all__ = ["RemoteStore", "SCHEMES", "after_conditional_put", "cache_root"]

MANIFEST = "manifest.json"
_SPECIAL = ("_staging", "_work", "_runs", "_trash", "_probe", "mlflow")
COMMIT_ATTEMPTS = 20


class RemoteStore:
    def __init__(self, root: str):
        bucket, prefix = parse_uri(root)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.cache = cache_root(self.root)

    def __reduce__(self):  # the filesystem and client are made again where it is unpickled
        return RemoteStore, (self.root,)

    def __repr__(self) -> str:
        return f"RemoteStore({self.root!r})"

    @cached_property
    def fs(self):
        import pyarrow.fs
        return pyarrow.fs.FileSystem.from_uri(self.root)[0]

    @cached_property
    def client(self):
        import boto3
        return boto3.client("s3")

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _path(self, *parts: str) -> str:
        return f"{self.bucket}/{self._key(*parts)}".rstrip("/")

    def check(self, create: bool) -> None:
        """A clear message when the bucket cannot be reached, read or (``create``) written,
        or when its server ignores the conditional put that commits a manifest."""
        check_usable(self, create)

    # -- paths -------------------------------------------------------------------------
    def artifact_dir(self, kind: str, key: str) -> str:
        return f"{self.root}/{kind}/{key}"

    def work_dir(self, kind: str, key: str) -> str:
        return os.path.join(self.cache, "_work", kind, key)

    def work_uri(self, kind: str, key: str) -> str:
        return f"{self.root}/_work/{kind}/{key}"

    def clear_work(self, kind: str, key: str) -> None:
        shutil.rmtree(self.work_dir(kind, key), ignore_errors=True)
        self._delete_dir(self._path("_work", kind, key))

    def train_storage(self, kind: str, key: str) -> str:
        return f"{self.work_uri(kind, key)}/ray_train"

    def sweep_storage(self) -> str:
        return f"{self.root}/_work/_sweeps"

    def runs_dir(self) -> str:
        """Local: where a sweep driver writes its tables and plots (also logged to MLflow,
        whose artifacts are on the store)."""
        return os.path.join(self.cache, "_runs")

    def new_staging_dir(self, kind: str, key: str) -> str:
        tag = f"{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        path = os.path.join(self.cache, "_staging", kind, tag)
        os.makedirs(path)
        return path

    def remote_staging(self, kind: str, key: str, staging: str) -> str | None:
        """Where Ray Data writes a stage's datasets: under the tag of its upload."""
        return f"{self.root}/{kind}/{key}/{os.path.basename(staging)}"

    def abandon(self, kind: str, key: str, staging: str) -> None:
        """Remove what a failed attempt staged, here and under its tag on the store."""
        shutil.rmtree(staging, ignore_errors=True)
        self._delete_dir(self._path(kind, key, os.path.basename(staging)))

    # -- reading -----------------------------------------------------------------------
    def _read_json(self, path: str):
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return None

    def _dirs(self, *parts: str) -> list[str]:
        import pyarrow.fs
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path(*parts),
                                                              allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)

    def manifest(self, kind: str, key: str) -> dict | None:
        return self._read_json(self._path(kind, key, MANIFEST))

    def is_committed(self, kind: str, key: str) -> bool:
        return self.manifest(kind, key) is not None

    def kinds(self) -> list[str]:
        return [d for d in self._dirs() if not d.startswith(_SPECIAL)]

    def manifests(self) -> list[dict]:
        out = []
        for kind in self.kinds():
            for key in self._dirs(kind):
                m = self.manifest(kind, key)
                if m is not None:
                    out.append(m)
        return out

    def find(self, key_prefix: str) -> list[dict]:
        return [m for m in self.manifests() if m["key"].startswith(key_prefix)]

    def _data(self, manifest: dict, *parts: str) -> str:
        return self._path(manifest["kind"], manifest["key"], manifest["data"], *parts)

    def exists(self) -> bool:
        import pyarrow.fs
        return self.fs.get_file_info(self._path()).type != pyarrow.fs.FileType.NotFound

    def open_input(self, manifest: dict, output: str):
        """Output ``output`` of a committed artifact, fetched and checked on the node that
        uses it (``fetch``): a dataset is read where it lives, by its ``s3://`` URI; a
        model's or report's ``path`` is a copy in that node's cache."""
        from ..artifacts import ARTIFACT_TYPES
        from .fetch import Committed
        entry = manifest["outputs"][output]
        return ARTIFACT_TYPES[entry["type"]].committed(Committed.of(self.root, manifest, output))

    def local_files(self, manifest: dict, rels: list[str]) -> list[str]:
        """Files of a committed artifact (plots to log), downloaded into the cache."""
        local = os.path.join(self.cache, manifest["kind"], manifest["key"], manifest["data"])
        out = []
        for rel in rels:
            dst = os.path.join(local, rel)
            if not os.path.exists(dst):
                download(f"s3://{self._data(manifest, rel)}", dst)
            out.append(dst)
        return out

    # -- committing --------------------------------------------------------------------
    def describe(self, kind: str, key: str, staging: str, outputs: dict) -> dict:
        """Upload the staging directory under its tag, then describe every output from
        what is under the tag (files Ray Data wrote there included)."""
        import pyarrow.fs
        import pyarrow.parquet as pq

        from .store import output_entry
        base = self._path(kind, key, os.path.basename(staging))
        known = {}
        for dirpath, _, names in os.walk(staging):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, staging)
                known[rel] = self._upload(full, f"{base}/{rel}")
        listed = {os.path.relpath(i.path, base): i.size for i in self.fs.get_file_info(
            pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
            if i.type == pyarrow.fs.FileType.File}
        for rel in sorted(set(listed) - set(known)):
            known[rel] = (listed[rel], self._hash(f"{base}/{rel}"))
        described = {}
        for out, artifact in outputs.items():
            d = os.path.relpath(artifact.path, staging)
            files = [(r[len(d) + 1:], size, sha) for r, (size, sha) in sorted(known.items())
                     if r.startswith(d + "/")]
            described[out] = output_entry(
                d, files, type(artifact).type_name, artifact.info,
                lambda rel, d=d: pq.ParquetFile(self.fs.open_input_file(f"{base}/{d}/{rel}")))
        return described

    def _upload(self, src: str, dst: str) -> tuple[int, str]:
        h, n = hashlib.sha256(), 0
        with open(src, "rb") as f, self.fs.open_output_stream(dst) as out:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
        return n, h.hexdigest()

    def _hash(self, path: str) -> str:
        return sha256_of(f"s3://{path}")[1]

    def commit(self, staging: str, manifest: dict, replace: bool = False) -> dict:
        """Put the manifest, naming the uploaded tag, if no manifest of the key exists
        (``replace``: whether or not one does). Returns the committed manifest: ours, or
        the one another run put first (our upload is then deleted)."""
        kind, key, tag = manifest["kind"], manifest["key"], os.path.basename(staging)
        manifest = {**manifest, "data": tag}
        body = json.dumps(manifest, indent=2, default=str).encode()
        old = self.manifest(kind, key) if replace else None
        for attempt in range(COMMIT_ATTEMPTS):
            code = self._put(self._key(kind, key, MANIFEST), body, conditional=not replace)
            winner = self.manifest(kind, key) if code == "PreconditionFailed" else None
            decision = after_conditional_put(code, winner is not None)
            if decision == "done":
                break
            if decision == "adopt":
                self._delete_dir(self._path(kind, key, tag))
                shutil.rmtree(staging, ignore_errors=True)
                return winner
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
        else:
            raise OSError(f"cannot commit {kind}/{key}: {COMMIT_ATTEMPTS} conditional puts of "
                          f"its manifest conflicted with other writes of it")
        if old is not None and old.get("data") not in (None, tag):
            self._delete_dir(self._data(old))
        shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def _put(self, key: str, body: bytes, conditional: bool) -> str | None:
        return put(self.client, self.bucket, key, body, conditional)

    def uncommit(self, kind: str, key: str) -> None:
        """Remove a committed artifact: its manifest first (from then on it does not
        exist), then the upload it named."""
        m = self.manifest(kind, key)
        self.client.delete_object(Bucket=self.bucket, Key=self._key(kind, key, MANIFEST))
        if m is not None and m.get("data"):
            self._delete_dir(self._data(m))

    def _delete_dir(self, path: str) -> None:
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:
            pass

    # -- run records -------------------------------------------------------------------
    def write_run(self, record: dict) -> str:
        path = self._path("_runs", f"{record['run_id']}.json")
        with self.fs.open_output_stream(path) as f:  # an object put is atomic
            f.write(json.dumps(record, indent=2, default=str).encode())
        return f"s3://{path}"

    def runs(self) -> list[dict]:
        import pyarrow.fs
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path("_runs"),
                                                              allow_not_found=True))
        out = [self._read_json(i.path) for i in infos if i.path.endswith(".json")]
        return sorted((r for r in out if r), key=lambda r: r.get("started", 0))

    def last_run(self, pipeline: str) -> dict | None:
        runs = [r for r in self.runs() if r.get("pipeline") == pipeline]
        return runs[-1] if runs else None

    # -- garbage -----------------------------------------------------------------------
    def garbage(self, keep: set | None, owner_alive) -> list[str]:
        """Uploads no manifest names (of runs no longer running), uncommitted or
        unreferenced artifacts, and the Ray Train checkpoints of committed artifacts.
        ``owner_alive(tag, mtime)``: whether the process that uploads under ``tag`` may
        still be running; ``mtime()`` is the newest write under the tag."""
        import pyarrow.fs

        def mtime(*parts):
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(
                self._path(*parts), recursive=True, allow_not_found=True))
            return max((i.mtime.timestamp() for i in infos if i.mtime), default=0.0)

        out = []
        for kind in self.kinds():
            for key in self._dirs(kind):
                m = self.manifest(kind, key)
                if m is not None and keep is not None and key not in keep:
                    out.append(f"s3://{self._path(kind, key)}")
                    continue
                out += [f"s3://{self._path(kind, key, tag)}" for tag in self._dirs(kind, key)
                        if (m is None or tag != m.get("data")) and not owner_alive(
                            tag, lambda: mtime(kind, key, tag))]
        for kind in self._dirs("_work"):
            if kind.startswith("_"):
                continue
            for key in self._dirs("_work", kind):
                if self.is_committed(kind, key) or keep is not None and key not in keep:
                    out.append(f"s3://{self._path('_work', kind, key)}")
        return out

    def remove(self, uri: str) -> None:
        self._delete_dir(uri[len("s3://"):])
