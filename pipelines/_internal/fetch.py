"""Verified copies of committed artifacts, made on the node that uses them.

A ``Committed`` names one output of a committed artifact: the store's root, the
artifact's kind and key, the stage that made it, and its manifest entry (every file with
its bytes and sha256). It is small and picklable: an input artifact carries one, and on
whichever node it is unpickled it gets its files there:

- ``local_dir()``: a directory of the output's files on this node, every file checked
  against the manifest: on a local store the store's own directory; on an ``s3://`` store
  a copy downloaded into this node's cache (``cache_root``, from this node's own
  ``DISTILL_CACHE_DIR``), under the committed upload's tag, so that a remade artifact
  never meets an old copy.
- ``verified_files()``: the parquet files where they live (local paths, or the store's
  URIs, which Ray Data reads from any node), each checked first; a remote object is
  hashed as it streams from the store, nothing kept.

What was checked is remembered per node, in one marker per output under
``cache_root(store)/.verified/<kind>/<key>/`` (local stores too): each file's location,
its size and modification time when it was checked, and the sha256 it matched. A file
whose size or mtime changed since is hashed again; an unchanged one is not, so a stage
re-reading its inputs, or a second actor on the node, pays one ``stat`` per file. Markers
are written under a file lock, which also makes the actors of one node download a copy
once. A file that does not match raises ``CorruptArtifact``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass

from ..errors import CorruptArtifact

CHUNK = 1 << 22
VERIFIED = ".verified"


def cache_dir() -> str:
    """This node's cache: ``DISTILL_CACHE_DIR``, or ``~/.cache/distillery/stores``."""
    return os.environ.get("DISTILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "distillery", "stores")


def cache_root(uri: str) -> str:
    """This node's cache directory of the store ``uri``: remote copies and markers."""
    return os.path.join(cache_dir(), hashlib.sha256(uri.encode()).hexdigest()[:16])


def is_remote(location: str) -> bool:
    return "://" in location


@functools.lru_cache(maxsize=8)
def _filesystem(scheme_and_bucket: str):
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(scheme_and_bucket)[0]


def _remote(uri: str):
    """The filesystem of a store URI, and the path in it."""
    scheme, _, rest = uri.partition("://")
    return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest


def _open(location: str):
    if is_remote(location):
        fs, path = _remote(location)
        return fs.open_input_stream(path)
    return open(location, "rb")


def sha256_of(location: str) -> tuple[int, str] | None:
    """Bytes and sha256 of a file, or of an object on a store; None if there is none."""
    h, n = hashlib.sha256(), 0
    try:
        with _open(location) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        return None
    return n, h.hexdigest()


def stamps(locations: list[str]) -> dict[str, list[int] | None]:
    """[size, mtime in ns] of each file or object (None: there is none)."""
    out: dict[str, list[int] | None] = {}
    remote = [loc for loc in locations if is_remote(loc)]
    if remote:
        import pyarrow.fs
        fs, _ = _remote(remote[0])
        infos = fs.get_file_info([_remote(loc)[1] for loc in remote])
        for loc, i in zip(remote, infos):
            out[loc] = ([i.size, i.mtime_ns or 0] if i.type == pyarrow.fs.FileType.File
                        else None)
    for loc in locations:
        if not is_remote(loc):
            try:
                st = os.stat(loc)
                out[loc] = [st.st_size, st.st_mtime_ns]
            except FileNotFoundError:
                out[loc] = None
    return out


def download(src: str, dst: str, want: tuple[int, str] | None = None) -> tuple[int, str] | None:
    """Copy the object ``src`` to the local file ``dst``, whole (a temporary file renamed
    at the end) and only if its bytes and sha256 are ``want`` (when given). Returns what
    it found (None: no such object)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.part-{uuid.uuid4().hex[:8]}"
    h, n = hashlib.sha256(), 0
    try:
        try:
            with _open(src) as f, open(tmp, "wb") as out:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            return None
        if want is None or (n, h.hexdigest()) == tuple(want):
            os.replace(tmp, dst)
        return n, h.hexdigest()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock among the processes of this node (``flock`` on ``path``)."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_marker(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_marker(path: str, marks: dict) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(marks, f)
    os.replace(tmp, path)


def forget(store_root: str, kind: str, key: str) -> None:
    """Drop this node's markers of an artifact, and its copies (``verify --repair``)."""
    root = cache_root(store_root)
    shutil.rmtree(os.path.join(root, VERIFIED, kind, key), ignore_errors=True)
    if is_remote(store_root):
        shutil.rmtree(os.path.join(root, kind, key), ignore_errors=True)


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if is_remote(base) else os.path.join(base, rel)


@dataclass(frozen=True)
class Committed:
    store: str            # the store's root: an absolute path, or s3://bucket/prefix
    kind: str
    key: str
    stage: str            # the stage (its name in the pipeline) that made the artifact
    output: str
    entry: dict           # the manifest's entry of the output: its files, bytes, sha256s
    data: str | None = None  # a remote store's tag of the committed upload

    @classmethod
    def of(cls, store_root: str, manifest: dict, output: str) -> "Committed":
        return cls(store_root, manifest["kind"], manifest["key"], manifest.get("stage", "?"),
                   output, manifest["outputs"][output], manifest.get("data"))

    @property
    def remote(self) -> bool:
        return is_remote(self.store)

    @property
    def where(self) -> str:
        """Where the output's files live on the store."""
        if self.remote:
            return f"{self.store}/{self.kind}/{self.key}/{self.data}/{self.entry['path']}"
        return os.path.join(self.store, self.kind, self.key, self.entry["path"])

    def location(self, rel: str) -> str:
        """Where the output's file ``rel`` lives on the store."""
        return _join(self.where, rel)

    def label(self) -> str:
        return (f"artifact {self.kind}/{self.key[:12]} (output '{self.output}', made by stage "
                f"'{self.stage}')")

    def advice(self) -> str:
        return (f"run `distill verify --repair --store {self.store}`, then run again (or "
                f"re-run the stage that made it with --force {self.stage})")

    def damage(self, f: dict, found: tuple[int, str] | None) -> str:
        got = "no such file" if found is None else f"{found[0]} bytes, sha256 {found[1][:12]}"
        return (f"{self.label()} is damaged: file {self.entry['path']}/{f['path']}: its "
                f"manifest lists {f['bytes']} bytes, sha256 {f['sha256'][:12]}; found {got}; "
                f"{self.advice()}")

    def local_dir(self) -> str:
        """A verified directory of the output's files on this node."""
        if not self.remote:
            return self._check(self.where, self.entry["files"], _in_place)
        target = os.path.join(cache_root(self.store), self.kind, self.key, self.data,
                              self.entry["path"])

        def fetch(f, loc):
            found = download(self.location(f["path"]), loc, (f["bytes"], f["sha256"]))
            return found, stamps([loc])[loc]

        return self._check(target, self.entry["files"], fetch)

    def verified_files(self, suffix: str = ".parquet") -> list[str]:
        """The output's files named ``*suffix`` where they live on the store, verified."""
        files = sorted((f for f in self.entry["files"] if f["path"].endswith(suffix)),
                       key=lambda f: f["path"])
        self._check(self.where, files, _in_place)
        return [self.location(f["path"]) for f in files]

    def _check(self, base: str, files: list[dict], produce) -> str:
        """Check ``files`` under ``base`` against the manifest, skipping those this node's
        marker shows unchanged since they were checked; ``produce(f, location)`` makes
        (found bytes and sha256, stamp) of a file that needs it. Returns ``base``."""
        marker = os.path.join(cache_root(self.store), VERIFIED, self.kind, self.key,
                              f"{self.output}.json")
        locs = {f["path"]: _join(base, f["path"]) for f in files}

        def pending(marks: dict) -> list[dict]:
            now = stamps(list(locs.values()))
            return [f for f in files if not _fresh(marks.get(locs[f["path"]]),
                                                   now[locs[f["path"]]], f)]

        if not pending(_read_marker(marker)):
            return base
        with locked(marker + ".lock"):
            marks = _read_marker(marker)
            todo, done = pending(marks), False
            try:
                for f in todo:
                    found, stamp = produce(f, locs[f["path"]])
                    if found is None or tuple(found) != (f["bytes"], f["sha256"]):
                        raise CorruptArtifact(self.damage(f, found))
                    marks[locs[f["path"]]] = [*stamp, f["sha256"]]
                    done = True
            finally:
                if done:
                    _write_marker(marker, marks)
        return base


def _fresh(mark, stamp, f: dict) -> bool:
    return (mark is not None and stamp is not None and stamp[0] == f["bytes"]
            and list(mark) == [*stamp, f["sha256"]])


def _in_place(f: dict, location: str):
    """Hash a file where it is: (bytes and sha256, its stamp from before the hashing)."""
    stamp = stamps([location])[location]
    return sha256_of(location), stamp
