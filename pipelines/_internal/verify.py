"""``distill verify``: re-hash committed artifacts against their manifests.

Every file of every committed artifact (or of those of one kind, or whose key starts with
a prefix) is read whole and hashed, this node's markers ignored: a file or remote object
that is missing, or whose bytes or sha256 differ from what the manifest lists, is damage.
``--repair`` uncommits each damaged artifact (its manifest first, then its files) and
drops this node's markers and copies of it, so the next run makes it again. Other nodes'
markers cannot vouch for the new artifact: they record the old files' mtimes (a local
store) or the old upload's tag (an ``s3://`` store), and the sha256 of the old manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..errors import UserError, allowed_list
from .fetch import Committed, forget, sha256_of
from .store import Store


@dataclass
class Damage:
    kind: str
    key: str
    stage: str
    output: str
    file: str                          # relative to the artifact's directory
    expected: tuple[int, str]          # bytes, sha256 from the manifest
    found: tuple[int, str] | None      # None: the file is missing

    def line(self) -> str:
        got = "no such file" if self.found is None else (
            f"{self.found[0]} bytes, sha256 {self.found[1][:12]}")
        return (f"damaged: {self.kind}/{self.key[:12]} (stage '{self.stage}', output "
                f"'{self.output}'): {self.file}: manifest lists {self.expected[0]} bytes, "
                f"sha256 {self.expected[1][:12]}; found {got}")


def open_existing(uri: str):
    """The store at ``uri``; one clear message if there is none."""
    store = Store.open(uri, create=False)
    if not store.exists():
        raise UserError(f"--store: there is no store at {store.root!r}; allowed: the --store "
                        f"of an earlier `distill run` (default .distill, or DISTILL_STORE)")
    return store


def select(store, ref: str | None) -> list[dict]:
    """The committed manifests to check: all, those of kind ``ref``, or those whose key
    starts with ``ref``."""
    manifests = store.manifests()
    if ref is None:
        return manifests
    kinds = sorted({m["kind"] for m in manifests})
    if ref in kinds:
        return [m for m in manifests if m["kind"] == ref]
    chosen = [m for m in manifests if m["key"].startswith(ref)]
    if not chosen:
        raise UserError(f"verify: {ref!r} is neither a kind nor the start of a key of a "
                        f"committed artifact in {store.root}; kinds there: "
                        f"{allowed_list(kinds)}")
    return chosen


def check(store, manifests: list[dict]) -> tuple[list[Damage], int]:
    """Every damaged file of ``manifests``, and how many files were hashed."""
    damaged, count = [], 0
    for m in manifests:
        for output in sorted(m["outputs"]):
            c = Committed.of(store.root, m, output)
            for f in c.entry["files"]:
                count += 1
                found = sha256_of(c.location(f["path"]))
                if found != (f["bytes"], f["sha256"]):
                    damaged.append(Damage(c.kind, c.key, c.stage, output,
                                          f"{c.entry['path']}/{f['path']}",
                                          (f["bytes"], f["sha256"]), found))
    return damaged, count


def repair(store, damaged: list[Damage]) -> list[str]:
    """Uncommit every artifact with damage; returns them as ``kind/key``."""
    removed = []
    for kind, key in dict.fromkeys((d.kind, d.key) for d in damaged):
        store.uncommit(kind, key)
        forget(store.root, kind, key)
        removed.append(f"{kind}/{key}")
    return removed


def verify_command(uri: str, ref: str | None, fix: bool, as_json: bool, out) -> int:
    """``distill verify``: 1 if damage is left in the store, else 0 (also after
    ``--repair`` removed all of it)."""
    store = open_existing(uri)
    manifests = select(store, ref)
    damaged, files = check(store, manifests)
    removed = repair(store, damaged) if fix else []
    if as_json:
        print(json.dumps({"store": store.root, "artifacts": len(manifests), "files": files,
                          "damaged": [asdict(d) for d in damaged], "removed": removed},
                         indent=2), file=out)
    else:
        for d in damaged:
            print(d.line(), file=out)
        for kind, _, key in (r.partition("/") for r in removed):
            print(f"removed {kind}/{key[:12]}: the next run makes it again", file=out)
        artifacts = len({(d.kind, d.key) for d in damaged})
        summary = (f"{len(damaged)} damaged file(s) in {artifacts} artifact(s)"
                   + (", removed" if removed else "; `distill verify --repair` removes them")
                   if damaged else "every file matches its manifest")
        print(f"verified {len(manifests)} artifact(s), {files} file(s) in {store.root}: "
              f"{summary}", file=out)
    return 1 if damaged and not removed else 0
