"""Checksums of local files and folders a stage reads by path (a pretrained model folder,
a prompt file): they enter the stage's cache key, so an edited folder re-runs it.

A folder's checksum is sha256 over its files' relative paths and sha256s, in sorted
order (``.git`` and ``__pycache__`` left out). Hashing a multi-GB pipeline folder on every
``plan`` would be slow, so each file's sha256 is remembered in this node's cache together
with its size, modification and change times and inode: a file that was rewritten or
replaced (even with its mtime kept, as ``cp -p`` does) is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os

from .fetch import cache_dir, sha256_of
from .store import write_json_atomic

SKIP = (".git", "__pycache__")


def memo_path() -> str:
    return os.path.join(cache_dir(), "content-hashes.json")


def _load_memo() -> dict:
    try:
        with open(memo_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_memo(memo: dict) -> None:
    try:
        write_json_atomic(memo_path(), memo)
    except OSError:
        pass  # a cache only: the next plan hashes again


def files_of(path: str) -> list[tuple[str, str]]:
    """(relative path, absolute path) of every file under ``path`` (or ``path`` itself)."""
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    out = []
    for dirpath, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            out.append((os.path.relpath(full, path), full))
    return sorted(out)


def content_checksum(path: str) -> str:
    """The checksum of a file or folder; ``FileNotFoundError`` if there is none."""
    path = os.path.realpath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    memo, dirty = _load_memo(), False
    digest = hashlib.sha256()
    for rel, full in files_of(path):
        st = os.stat(full)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        known = memo.get(full)
        if known and known[:-1] == stamp:
            sha = known[-1]
        else:
            sha = sha256_of(full)[1]
            memo[full], dirty = stamp + [sha], True
        digest.update(f"{rel}:{sha}\n".encode())
    if dirty:
        _save_memo(memo)
    return digest.hexdigest()
