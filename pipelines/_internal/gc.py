"""Garbage collection of a store: staging debris, uncommitted artifact directories, the
work directories (checkpoints) of committed artifacts, and optionally artifacts that no
pipeline's last run references."""

from __future__ import annotations

import os
import shutil
import socket
import time

from .remote_store import RemoteStore
from .store import Store


def _size(path: str) -> int:
    total = 0
    for dp, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.path.getsize(os.path.join(dp, f))
            except OSError:
                pass
    return total


def _newest_write(path: str) -> float:
    """The time of the newest write under ``path`` (a directory's own mtime changes only
    when an entry directly in it does)."""
    newest = os.path.getmtime(path)
    for dp, ds, fs in os.walk(path):
        for name in ds + fs:
            try:
                newest = max(newest, os.path.getmtime(os.path.join(dp, name)))
            except OSError:
                pass
    return newest


def _listdir(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _owner_alive(tag: str, mtime, other_host_grace_s: float = 24 * 3600) -> bool:
    """Staging directories (and a remote store's uploads) are named
    '<key>.<host>.<pid>.<nonce>': keep those whose process still runs on this host, and
    those of other hosts (other nodes of a cluster) written to in the last day
    (``mtime()``: the time of the newest write)."""
    parts = tag.split(".")
    if len(parts) < 4:
        return False
    if parts[-3] != socket.gethostname():
        try:
            return time.time() - mtime() < other_host_grace_s
        except OSError:
            return False
    try:
        pid = int(parts[-2])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; it only waits to be reaped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _keep(store) -> set[str]:
    """Keys the last run of every pipeline, and every run in progress, uses."""
    keep: set[str] = set()
    last: dict[str, dict] = {}
    for r in store.runs():
        last[r.get("pipeline")] = r
        if r.get("ok") is None:  # a run in progress keeps everything it uses
            keep |= {s.get("key") for s in r.get("states", {}).values()}
    for r in last.values():
        keep |= {s.get("key") for s in r.get("states", {}).values()}
    return keep


def garbage(store: Store, unreferenced: bool = False) -> list[str]:
    """Paths (or, on a remote store, URIs) ``collect`` would remove (pure read of the
    store)."""
    keep = _keep(store) if unreferenced else None
    if isinstance(store, RemoteStore):  # and this node's staging and work directories
        return (_staging(os.path.join(store.cache, "_staging")) +
                store.garbage(keep, _owner_alive) +
                _work(store, os.path.join(store.cache, "_work"), keep))
    out = _staging(os.path.join(store.root, "_staging"))
    trash = os.path.join(store.root, "_trash")
    out += [os.path.join(trash, t) for t in _listdir(trash)]
    for kind in store.kinds():
        for key in _listdir(os.path.join(store.root, kind)):
            path = store.artifact_dir(kind, key)
            committed = store.is_committed(kind, key)
            if not committed or (keep is not None and key not in keep):
                out.append(path)
    return out + _work(store, os.path.join(store.root, "_work"), keep)


def _work(store, work: str, keep: set | None) -> list[str]:
    """Checkpoints of a finished stage go; those of an unfinished one are kept for resume,
    unless unreferenced artifacts are collected too."""
    return [os.path.join(work, kind, key) for kind in _listdir(work)
            for key in _listdir(os.path.join(work, kind))
            if store.is_committed(kind, key) or keep is not None and key not in keep]


def _staging(staging: str) -> list[str]:
    out = []
    for kind in _listdir(staging):
        out += [os.path.join(staging, kind, tag) for tag in _listdir(os.path.join(staging, kind))
                if not _owner_alive(tag, lambda: _newest_write(
                    os.path.join(staging, kind, tag)))]
    return out


def collect(store: Store, unreferenced: bool = False, dry_run: bool = False):
    paths = garbage(store, unreferenced)
    if isinstance(store, RemoteStore):  # freed bytes are not counted on object storage
        for p in [] if dry_run else paths:
            if "://" in p:
                store.remove(p)
            else:
                shutil.rmtree(p, ignore_errors=True)
        return paths, 0
    freed = sum(_size(p) if os.path.isdir(p) else os.path.getsize(p) for p in paths
                if os.path.exists(p))
    if not dry_run:
        for p in paths:
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
    return paths, freed
