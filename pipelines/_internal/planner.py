"""Building a plan: every stage's key and the decision cached / run, with the reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import UserError, allowed_list, did_you_mean
from .content import content_checksum
from .plan import Decision, StageState, code_warning, decide, fresh, input_refs
from .store import Store


@dataclass
class Plan:
    pipeline: object
    store: Store
    states: dict[str, StageState]
    decisions: dict[str, Decision]
    warnings: list[str] = field(default_factory=list)
    # cached stages below a forced one: they run too if it commits different content
    checks: list[str] = field(default_factory=list)

    def to_run(self) -> list[str]:
        return [n for n, d in self.decisions.items() if d.status == "run"]

    def to_json(self) -> dict:
        return {"pipeline": self.pipeline.name, "store": self.store.root,
                "stages": [{"name": n, "kind": self.states[n].kind, "status": d.status,
                            "key": d.key, "reason": d.reason}
                           for n, d in self.decisions.items()],
                "warnings": self.warnings}


def stage_states(pipeline, known: dict[str, str] | None = None) -> dict[str, StageState]:
    """Every stage's state, in order; ``known``: content checksums by path already taken
    (a sweep's trials reuse its driver's, on nodes that may not have the files)."""
    states: dict[str, StageState] = {}
    for name in pipeline.order():
        node = pipeline.nodes[name]
        config, execution, kept = node.stage.config.split_execution()
        states[name] = StageState(
            name=name, kind=node.kind, version=node.stage.version, config=config,
            seed=pipeline.seed,
            inputs={i: _each(w, lambda up, out: f"{states[up].key}/{out}")
                    for i, w in node.inputs.items()},
            upstream={i: _each(w, lambda up, _: up) for i, w in node.inputs.items()},
            execution=execution, kept=kept, contents=contents_of(name, node, known or {}))
    return states


def _each(wired, fn):
    """``fn(stage, output)`` of an input's (stage, output), or of each of a variadic's."""
    return [fn(*w) for w in wired] if isinstance(wired, list) else fn(*wired)


def contents_of(name: str, node, known: dict[str, str]) -> dict[str, str]:
    """Checksums of the local files and folders the stage reads by path."""
    out = {}
    for fld, path in node.stage.content_paths().items():
        if path in known:
            out[fld] = known[path]
            continue
        try:
            out[fld] = content_checksum(path)
        except OSError as e:
            raise UserError(f"stage '{name}' ({node.kind}): field '{fld}': {path!r} "
                            f"cannot be read ({e.strerror or 'no such file or folder'}); "
                            f"allowed: an existing local file or folder") from None
    return out


def known_contents(pipeline) -> dict[str, str]:
    """path -> content checksum of every file or folder the pipeline's stages read (a
    path that cannot be read is left out: planning says so, naming the stage)."""
    out = {}
    for node in pipeline.nodes.values():
        for path in node.stage.content_paths().values():
            try:
                out[path] = content_checksum(path)
            except OSError:
                continue
    return out


def make_plan(pipeline, store: Store, force: Iterable[str] = (),
              known: dict[str, str] | None = None) -> Plan:
    force = list(force)
    for f in force:
        if f not in pipeline.nodes:
            raise UserError(f"--force: no stage '{f}'{did_you_mean(f, pipeline.nodes)}; "
                            f"stages: {allowed_list(pipeline.nodes)}")
    states = stage_states(pipeline, known)
    last = store.last_run(pipeline.name)
    previous = (last or {}).get("states", {})
    decisions: dict[str, Decision] = {}
    warnings: list[str] = []
    running: set[str] = set()
    checks: list[str] = []
    manifests: dict[str, dict] = {}
    for name, state in states.items():
        manifest = store.manifest(state.kind, state.key)
        d = decide(state, manifest is not None, name in force, previous.get(name), running)
        if d.status == "cached":
            manifests[name] = manifest
            w = code_warning(name, manifest, type(pipeline.nodes[name].stage).code_hash())
            if w:
                warnings.append(w)
            d = fresh_decision(pipeline, name, d, manifest, manifests, running, checks,
                               set(force))
        if d.status == "run":
            running.add(name)
        decisions[name] = d
    return Plan(pipeline, store, states, decisions, warnings, checks)


def fresh_decision(pipeline, name: str, d: Decision, manifest: dict, manifests: dict,
                   running: set[str], checks: list[str], force: set[str]) -> Decision:
    """Freshness by content for a cached stage (its key unchanged): below a stage that runs
    under its old key (forced, or remade after ``verify --repair``), it is checked when that
    one commits (``checks``); with every upstream cached, it runs if the content it was made
    from is not what its upstream artifacts hold now (one of them was remade since)."""
    above = sorted(r for r in running if name in pipeline.downstream(r))
    if above:
        checks.append(name)
        which = ", ".join(f"'{f}'" + (" (forced)" if f in force else "") for f in above)
        return Decision(name, d.key, "cached", f"{d.reason}; runs too if {which} commits "
                        f"different content")
    if manifest.get("input_content") is None:
        return d
    changed = fresh(manifest, input_refs(pipeline, name, manifests))
    if not changed:
        return d
    return Decision(name, d.key, "run", f"input content changed: {', '.join(changed)} (an "
                    f"upstream artifact was remade with other content since this one was "
                    f"made)", forced=True)
