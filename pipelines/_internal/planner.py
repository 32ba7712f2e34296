"""Building a plan: every stage's key and the decision cached / run, with the reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import UserError, allowed_list, did_you_mean
from .content import content_checksum
from .plan import Decision, StageState, code_warning, decide
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


def stage_states(pipeline) -> dict[str, StageState]:
    states: dict[str, StageState] = {}
    for name in pipeline.order():
        node = pipeline.nodes[name]
        config, execution, kept = node.stage.config.split_execution()

        def ref(wired, field):
            if isinstance(wired, list):
                return [ref(w, field) for w in wired]
            up, out = wired
            return f"{states[up].key}/{out}" if field == "key" else up

        states[name] = StageState(
            name=name, kind=node.kind, version=node.stage.version, config=config,
            seed=pipeline.seed, inputs={i: ref(w, "key") for i, w in node.inputs.items()},
            upstream={i: ref(w, "up") for i, w in node.inputs.items()},
            execution=execution, kept=kept, contents=contents_of(name, node))
    return states


def contents_of(name: str, node) -> dict[str, str]:
    """Checksums of the local files and folders the stage reads by path."""
    out = {}
    for fld, path in node.stage.content_paths().items():
        try:
            out[fld] = content_checksum(path)
        except OSError as e:
            raise UserError(f"stage '{name}' ({node.kind}): field '{fld}': {path!r} "
                            f"cannot be read ({e.strerror or 'no such file or folder'}); "
                            f"allowed: an existing local file or folder") from None
    return out


def make_plan(pipeline, store: Store, force: Iterable[str] = ()) -> Plan:
    force = list(force)
    for f in force:
        if f not in pipeline.nodes:
            raise UserError(f"--force: no stage '{f}'{did_you_mean(f, pipeline.nodes)}; "
                            f"stages: {allowed_list(pipeline.nodes)}")
    states = stage_states(pipeline)
    last = store.last_run(pipeline.name)
    previous = (last or {}).get("states", {})
    decisions: dict[str, Decision] = {}
    warnings: list[str] = []
    running: set[str] = set()
    checks: list[str] = []
    for name, state in states.items():
        manifest = store.manifest(state.kind, state.key)
        d = decide(state, manifest is not None, name in force, previous.get(name), running)
        if d.status == "run":
            running.add(name)
        else:
            w = code_warning(name, manifest, type(pipeline.nodes[name].stage).code_hash())
            if w:
                warnings.append(w)
            forced_above = sorted(f for f in force if name in pipeline.downstream(f))
            if forced_above:  # freshness by content, decided when they commit
                checks.append(name)
                d = Decision(name, d.key, "cached", f"{d.reason}; runs too if forced "
                             f"{', '.join(repr(f) for f in forced_above)} commits different "
                             f"content")
        decisions[name] = d
    return Plan(pipeline, store, states, decisions, warnings, checks)
