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
- inputs are downloaded into a cache on the node that runs the stage, each file checked
  against the sha256 its manifest lists, a marker written once all of an output's files
  are checked; a dataset input also keeps its ``s3://`` URI, so Ray Data reads it from
  the store on any node;
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

from ..errors import UserError

MANIFEST = "manifest.json"
SCHEMES = ("s3",)
_SPECIAL = ("_staging", "_work", "_runs", "_trash", "_probe", "mlflow")
COMMIT_ATTEMPTS = 20


def after_conditional_put(error_code: str | None, winner_readable: bool) -> str:
    """What a commit does after its put of a manifest (``error_code``: None if the put
    succeeded, else the code of S3's refusal of a conditional put): ``done``, ``adopt`` the
    manifest another run committed, or ``retry`` the put. S3 answers 412
    ``PreconditionFailed`` when the manifest exists, and 409 ``ConditionalRequestConflict``
    while a concurrent write of the same key is in flight, which AWS says to retry: that
    write may yet fail."""
    if error_code is None:
        return "done"
    if error_code == "PreconditionFailed" and winner_readable:
        return "adopt"
    return "retry"  # a conflict in flight, or a manifest removed since (gc): put again


def cache_root(uri: str) -> str:
    """This node's cache directory of the remote store ``uri``."""
    base = os.environ.get("DISTILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "distillery", "stores")
    return os.path.join(base, hashlib.sha256(uri.encode()).hexdigest()[:16])


class RemoteStore:
    def __init__(self, root: str):
        scheme, _, rest = root.partition("://")
        if scheme not in SCHEMES:
            raise UserError(f"--store: scheme '{scheme}://' of {root!r} is not supported; "
                            f"allowed: a local path, file://, " +
                            ", ".join(f"{s}://bucket/prefix" for s in SCHEMES))
        if "?" in rest or "#" in rest:
            raise UserError(f"--store: {root!r} carries a query or fragment (options such as "
                            f"an endpoint go in the environment); allowed: s3://bucket/prefix, "
                            f"with AWS_ENDPOINT_URL and the credentials in the environment")
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            raise UserError("--store: the store URI carries credentials or a port, which would "
                            "be logged with every run; allowed: s3://bucket/prefix, with the "
                            "credentials and endpoint in the environment (AWS_ACCESS_KEY_ID, "
                            "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)")
        if not bucket:
            raise UserError(f"--store: {root!r} names no bucket; allowed: s3://bucket/prefix")
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
        from botocore.exceptions import BotoCoreError, ClientError
        honoured = True
        try:
            if create:
                name = uuid.uuid4().hex
                probe = self._path("_probe", name)
                with self.fs.open_output_stream(probe) as f:
                    f.write(b"ok")
                # a second, conditional put that must be refused: commits rely on it
                honoured = self._put(self._key("_probe", name), b"again", True) is not None
                self.fs.delete_file(probe)
            else:
                self.fs.get_file_info(self._path())
        except (OSError, BotoCoreError, ClientError) as e:
            cause = str(e).splitlines()[0][:300]
            raise UserError(f"--store: store {self.root!r} cannot be "
                            f"{'written' if create else 'read'} ({cause}); allowed: "
                            f"s3://bucket/prefix of an existing bucket that the credentials "
                            f"in the environment may {'write' if create else 'read'}") from None
        if not honoured:
            raise UserError(f"--store: the S3 server of {self.root!r} ignores conditional "
                            f"writes (a put with If-None-Match: * replaced an existing "
                            f"object), so two runs could both commit one artifact; allowed: a "
                            f"server that honours If-None-Match on PutObject (AWS S3 does)")

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

    def open_input(self, manifest: dict, output: str):
        """Output ``output`` of a committed artifact: a dataset by its ``s3://`` URI, read
        where it lives; a model or report downloaded into this node's cache, each file
        checked against its sha256."""
        from dataclasses import replace

        from ..artifacts import ARTIFACT_TYPES, Dataset
        entry = manifest["outputs"][output]
        local = os.path.join(self.cache, manifest["kind"], manifest["key"])
        artifact = ARTIFACT_TYPES[entry["type"]].from_manifest(local, entry)
        uri = f"s3://{self._data(manifest, entry['path'])}"
        if isinstance(artifact, Dataset):  # read where it lives, by any node
            return replace(artifact, uri=uri)
        self._fetch(manifest, entry, local)
        return replace(artifact, uri=uri)

    def _fetch(self, manifest: dict, entry: dict, local: str) -> None:
        marker = os.path.join(local, ".verified", entry["path"].replace("/", "_"))
        target = os.path.join(local, entry["path"])
        try:
            with open(marker) as f:
                if f.read() == entry["checksum"] and all(
                        os.path.getsize(os.path.join(target, x["path"])) == x["bytes"]
                        for x in entry["files"]):
                    return
        except OSError:
            pass
        for x in entry["files"]:
            self._download(self._data(manifest, entry["path"], x["path"]),
                           os.path.join(target, x["path"]), x["sha256"], x["bytes"])
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        tmp = f"{marker}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(entry["checksum"])
        os.replace(tmp, marker)

    def _download(self, src: str, dst: str, sha256: str | None, size: int | None) -> None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.part-{uuid.uuid4().hex[:8]}"
        h, n = hashlib.sha256(), 0
        try:
            with self.fs.open_input_stream(src) as f, open(tmp, "wb") as out:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    n += len(chunk)
                    out.write(chunk)
            if (sha256 is not None and h.hexdigest() != sha256) or (size is not None
                                                                    and n != size):
                raise OSError(f"s3://{src}: {n} bytes with sha256 {h.hexdigest()[:12]}, its "
                              f"manifest lists {size} bytes with sha256 {str(sha256)[:12]}: "
                              f"the store's copy is corrupted")
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def local_files(self, manifest: dict, rels: list[str]) -> list[str]:
        """Files of a committed artifact (plots to log), downloaded into the cache."""
        local = os.path.join(self.cache, manifest["kind"], manifest["key"])
        out = []
        for rel in rels:
            dst = os.path.join(local, rel)
            if not os.path.exists(dst):
                self._download(self._data(manifest, rel), dst, None, None)
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
        h = hashlib.sha256()
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()

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
        """Put an object (``conditional``: only if none exists at ``key``); None, or the
        error code of a conditional put that S3 refused."""
        from botocore.exceptions import ClientError
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                   **({"IfNoneMatch": "*"} if conditional else {}))
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            return code
        return None

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
