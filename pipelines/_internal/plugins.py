"""Stage kinds from Python entry points: how the core finds stages without importing them.

A package adds stage kinds by declaring entry points in the group ``distillery.stages``,
one per kind, named by the kind and pointing at the class; distillery's own catalog is
declared the same way, in its ``pyproject.toml``::

    [project.entry-points."distillery.stages"]
    load-digits = "stages.data.digits:LoadDigits"

Discovery reads the installed packages' metadata only (names, values, which package and
version). A kind's module is imported when that kind is first asked for, so a pipeline
imports the modules of its own kinds and nothing else, and a broken plugin fails only the
pipelines that use it. A kind claimed by two packages, an entry point that does not
import, or one that names something other than a ``Stage`` of that very kind is a
``UserError`` saying which package to fix.

Loading a kind's module defines its class, and ``Stage.__init_subclass__`` registers it
(``pipelines.stage``); Ray workers unpickle a stage by its module, which an installed
package makes importable on every node, and the re-registration of the same class there is
harmless.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata

from ..errors import UserError

GROUP = "distillery.stages"


@dataclass(frozen=True)
class Claim:
    """One entry point of the group: a package's claim to a stage kind."""
    kind: str
    value: str         # "package.module:Class"
    package: str       # the distribution's name, as its metadata spells it
    version: str
    entry_point: metadata.EntryPoint

    @property
    def source(self) -> str:
        return f"{self.package} {self.version}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "package": self.package, "version": self.version,
                "object": self.value}


def _entry_points() -> list[tuple[metadata.EntryPoint, str, str]]:
    """Every installed entry point of the group, with its distribution's name and version
    (tests replace this function to install fake plugins)."""
    found = []
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        name = dist.name if dist is not None else "(unknown package)"
        version = dist.version if dist is not None else "?"
        found.append((ep, name, version))
    return found


@functools.lru_cache(maxsize=1)
def claims() -> dict[str, tuple[Claim, ...]]:
    """Kind -> the entry points claiming it (more than one only when packages conflict),
    read once per process; ``refresh()`` reads them again."""
    by_kind: dict[str, list[Claim]] = {}
    for ep, package, version in _entry_points():
        by_kind.setdefault(ep.name, []).append(Claim(ep.name, ep.value, package, version, ep))
    return {kind: tuple(found) for kind, found in sorted(by_kind.items())}


def refresh() -> None:
    """Forget the entry points read so far (after installing a package in-process)."""
    claims.cache_clear()


def kinds() -> list[str]:
    """The kinds the installed entry points name, without importing any of them."""
    return list(claims())


def conflict(kind: str) -> UserError | None:
    """The error for a kind that more than one package claims, or None."""
    found = claims().get(kind, ())
    if len({c.package for c in found}) < 2:
        return None
    named = "; ".join(f"{c.source} ({c.value})" for c in found)
    return UserError(f"stage kind '{kind}' is claimed by {len(found)} installed packages: "
                     f"{named}; uninstall one of them, or rename the kind in one package's "
                     f"[project.entry-points.\"{GROUP}\"]")


def conflicts() -> list[UserError]:
    """The error of every kind more than one package claims."""
    return [p for p in map(conflict, claims()) if p is not None]


def load(kind: str, where: str = "pipeline") -> type:
    """The class of ``kind``, importing only its entry point's module. Every way an entry
    point can be wrong is a ``UserError`` naming the kind, the entry point and its package."""
    from ..stage import Stage
    found = claims().get(kind)
    if not found:
        raise KeyError(kind)
    problem = conflict(kind)
    if problem is not None:
        raise UserError(f"{where}: {problem}")
    claim = found[0]
    what = f"{where}: stage kind '{kind}' (entry point '{kind} = {claim.value}' of {claim.source})"
    try:
        obj = claim.entry_point.load()
    except Exception as e:  # an import error, a missing attribute, an error in the module
        raise UserError(f"{what} does not load: {type(e).__name__}: {e}; fix or reinstall "
                        f"{claim.package}, or uninstall it") from e
    if not (isinstance(obj, type) and issubclass(obj, Stage)):
        raise UserError(f"{what} names {obj!r}, which is not a subclass of "
                        f"pipelines.Stage; an entry point of group '{GROUP}' names a Stage class")
    declared = obj.__dict__.get("kind")
    if declared != kind:
        raise UserError(f"{what} names class {obj.__module__}.{obj.__qualname__}, whose kind "
                        f"is {declared!r}; the entry point's name and the class's kind must be "
                        f"the same")
    return obj


def names_class(kind: str, cls: type) -> bool:
    """Whether ``kind``'s entry point names ``cls`` by its definition (no import): true
    for a class loaded through its entry point or imported directly from its module."""
    return any(c.value == f"{cls.__module__}:{cls.__qualname__}" for c in claims().get(kind, ()))


def missing_hint() -> str:
    """A hint for an unknown kind when no entry point at all is installed: distillery's own
    metadata is missing or stale (an old ``*.egg-info`` folder shadowing the install)."""
    if claims():
        return ""
    return (f"; no installed package declares entry points of group '{GROUP}': reinstall "
            f"distillery (`make install`, or `pip install -e .` in its folder)")


def check() -> list[UserError]:
    """Every problem of the installed entry points: conflicts, and each kind loaded (this
    imports every kind's module)."""
    from ..stage import get_stage_class
    problems = []
    for kind in claims():
        try:
            get_stage_class(kind, "distill kinds --check")
        except UserError as e:
            problems.append(e)
    return problems


def table(rows: list[dict]) -> str:
    """``Claim.to_json()`` rows as aligned text: kind, package and version, object."""
    lines = [("kind", "package", "object")] + [
        (r["kind"], f"{r['package']} {r['version']}", r["object"]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in (0, 1)]
    return "\n".join(f"{k:<{widths[0]}}  {p:<{widths[1]}}  {o}" for k, p, o in lines)
