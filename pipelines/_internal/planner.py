"""Building a plan: every stage's key and the decision cached / run, with the reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import UserError, allowed_list, did_you_mean
from .plan import Decision, StageState, code_warning, decide
from .store import Store


@dataclass
class Plan:
    pipeline: object
    store: Store
    states: dict[str, StageState]
    decisions: dict[str, Decision]
    warnings: list[str] = field(default_factory=list)

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
        states[name] = StageState(
            name=name, kind=node.kind, version=node.stage.version,
            config=node.stage.config.model_dump(mode="json"), seed=pipeline.seed,
            inputs={i: f"{states[up].key}/{out}" for i, (up, out) in node.inputs.items()},
            upstream={i: up for i, (up, _) in node.inputs.items()})
    return states


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
    for name, state in states.items():
        manifest = store.manifest(state.kind, state.key)
        d = decide(state, manifest is not None, name in force, previous.get(name), running)
        decisions[name] = d
        if d.status == "run":
            running.add(name)
            if d.forced and manifest is not None and pipeline.downstream(name) - set(force):
                warnings.append(
                    f"--force {name}: its artifact is replaced under the same key; stages "
                    f"downstream of it stay cached ({', '.join(sorted(pipeline.downstream(name)))})"
                    f"; force them too to recompute them from the new artifact")
        elif manifest is not None:
            w = code_warning(name, manifest, type(pipeline.nodes[name].stage).code_hash())
            if w:
                warnings.append(w)
    return Plan(pipeline, store, states, decisions, warnings)
