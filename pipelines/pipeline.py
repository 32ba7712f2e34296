"""Pipelines: named stage instances wired by name, validated when built.

In Python::

    p = Pipeline("quickstart", seed=0)
    p.add("data", "load-digits")
    p.add("teacher", "fit-classifier", {"epochs": 10}, inputs={"data": "data"})
    p.add("signal", "teacher-outputs", inputs={"model": "teacher", "data": "data.data"})

or from YAML with ``Pipeline.from_yaml(path, overrides=["teacher.epochs=3"])``. An input
reference is ``stage`` (its only output, or the output named like the input) or
``stage.output``. Unknown kinds or names (with "did you mean"), missing or mistyped inputs
and cycles are errors before anything runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ._internal.validation import build_config
from .errors import UserError, allowed_list, did_you_mean
from .stage import Many, Resources, Stage, get_stage_class

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass
class Node:
    name: str
    stage: Stage
    refs: dict[str, str | list[str]]          # input name -> reference(s) as written
    # input name -> (stage, output); a variadic input (``Many``): a list of them
    inputs: dict[str, tuple[str, str] | list[tuple[str, str]]] = field(default_factory=dict)
    resources: Resources | None = None
    register: str | None = None  # a Model Registry name (not part of the key)

    def wired(self) -> list[tuple[str, str, str]]:
        """Every (input, upstream stage, output) edge, variadic inputs flattened."""
        return [(inp, up, out) for inp, ref in self.inputs.items()
                for up, out in (ref if isinstance(ref, list) else [ref])]

    @property
    def kind(self) -> str:
        return self.stage.kind

    @property
    def effective_resources(self) -> Resources:
        return self.resources or self.stage.resources


class Pipeline:
    def __init__(self, name: str = "pipeline", seed: int = 0):
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"pipeline: name {name!r} is not valid; allowed: letters, digits, "
                            f"'_' and '-', starting with a letter or '_'")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"pipeline: seed {seed!r} is not valid; allowed: an integer")
        self.name, self.seed = name, seed
        self.nodes: dict[str, Node] = {}

    # -- building ----------------------------------------------------------------------
    def add(self, name: str, stage: Stage | str, config: dict | None = None,
            inputs: dict[str, str] | None = None, resources: dict | None = None,
            register: str | None = None) -> "Pipeline":
        """Add a stage instance (or a kind plus its config) under ``name``; validated at
        once against the stages added before it. ``register``: see ``register``."""
        self._add(name, stage, config, inputs, resources)
        if register is not None:
            self.register(name, register)
        self.validate()
        return self

    def register(self, stage: str, name: str) -> "Pipeline":
        """Make ``distill run`` register the student of ``stage`` (a stage whose kind has
        ``mlflow_outputs``) as a version of the Model Registry model ``name``: one version
        per artifact key. Execution only: not part of any cache key."""
        students = [n for n, node in self.nodes.items() if type(node.stage).mlflow_outputs]
        if stage not in self.nodes:
            raise UserError(f"register: stage '{stage}' is not in pipeline '{self.name}'"
                            f"{did_you_mean(stage, self.nodes)}; stages that make a student: "
                            f"{allowed_list(students)}")
        node = self.nodes[stage]
        if not type(node.stage).mlflow_outputs:
            raise UserError(f"stage '{stage}' ({node.kind}): register: only a student can be "
                            f"registered, and a {node.kind} stage makes none; stages of "
                            f"pipeline '{self.name}' that make a student: "
                            f"{allowed_list(students)}")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"stage '{stage}' ({node.kind}): register: name {name!r} is not "
                            f"valid; allowed: a non-empty Model Registry name")
        node.register = name
        return self

    def _add(self, name, stage, config, inputs, resources) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"pipeline '{self.name}': stage name {name!r} is not valid; allowed: "
                            f"letters, digits, '_' and '-', starting with a letter or '_'")
        if name in self.nodes:
            raise UserError(f"pipeline '{self.name}': stage name '{name}' is used twice")
        where = f"stage '{name}'"
        if isinstance(stage, str):
            cls = get_stage_class(stage, where)
            stage = cls(build_config(cls.Config, config or {}, f"{where} ({cls.kind}): config"))
        elif isinstance(stage, Stage):
            if config:
                raise UserError(f"{where}: pass either a Stage instance or a kind with a config")
        else:
            raise UserError(f"{where}: stage {stage!r} is not valid; allowed: a Stage instance "
                            f"or a registered kind name")
        if inputs is not None and not isinstance(inputs, dict):
            raise UserError(f"{where} ({stage.kind}): inputs {inputs!r} is not valid; allowed: "
                            f"a mapping of input name to 'stage' or 'stage.output'")
        res = None
        if resources:
            res = build_config(Resources, stage.resources.model_dump() | dict(resources),
                               f"{where} ({stage.kind}): resources")
        self.nodes[name] = Node(name, stage, dict(inputs or {}), resources=res)

    @classmethod
    def from_dict(cls, spec: dict, overrides: Iterable[str] = (),
                  register: Iterable[str] = ()) -> "Pipeline":
        """``register``: ``STAGE=NAME`` items (``distill run --register``)."""
        from ._internal.config_file import pipeline_from_dict
        return pipeline_from_dict(spec, overrides, register)

    @classmethod
    def from_yaml(cls, path: str, overrides: Iterable[str] = (),
                  register: Iterable[str] = ()) -> "Pipeline":
        from ._internal.config_file import load_yaml
        return cls.from_dict(load_yaml(path), overrides, register)

    def to_dict(self) -> dict:
        """The resolved pipeline, as a dict that ``from_dict`` (and ``distill run``) take."""
        stages = {}
        for n in self.nodes.values():
            entry = {"kind": n.kind, "config": n.stage.config.model_dump(mode="json")}
            if n.inputs:
                entry["inputs"] = {i: [f"{s}.{o}" for s, o in ref] if isinstance(ref, list)
                                   else f"{ref[0]}.{ref[1]}" for i, ref in n.inputs.items()}
            if n.resources is not None:
                entry["resources"] = n.resources.model_dump()
            if n.register is not None:
                entry["register"] = n.register
            stages[n.name] = entry
        return {"name": self.name, "seed": self.seed, "stages": stages}

    # -- validation --------------------------------------------------------------------
    def validate(self) -> "Pipeline":
        for node in self.nodes.values():
            node.inputs = {}
            self._wire(node)
        self.order()  # raises on a cycle
        return self

    def _wire(self, node: Node) -> None:
        cls = type(node.stage)
        where = f"stage '{node.name}' ({node.kind})"
        allowed = {**cls.inputs, **cls.optional_inputs}
        for given in node.refs:
            if given not in allowed:
                raise UserError(f"{where}: unknown input '{given}'{did_you_mean(given, allowed)}; "
                                f"allowed inputs: {allowed_list(allowed)}")
        for inp, want in allowed.items():
            ref = node.refs.get(inp)
            if isinstance(want, Many):
                if inp in node.refs and not isinstance(ref, list):
                    raise UserError(f"{where}: input '{inp}' takes any number of "
                                    f"{want.type.type_name}s, wired as a list; got {ref!r}; "
                                    f"allowed: [<stage>, <stage>.<output>, ...]")
                if inp in node.refs:
                    node.inputs[inp] = [self._resolve(where, inp, want.type, r, node.name)
                                        for r in ref]
                    dup = sorted({up for up, _ in node.inputs[inp]
                                  if [u for u, _ in node.inputs[inp]].count(up) > 1})
                    if dup:
                        raise UserError(f"{where}: input '{inp}' names stage(s) {dup} twice; "
                                        f"allowed: each stage once")
                    continue
            elif inp in node.refs:
                node.inputs[inp] = self._resolve(where, inp, want, ref, node.name)
                continue
            if inp in cls.inputs:
                form = "[<stage>, ...]" if isinstance(want, Many) else "<stage> or <stage>.<output>"
                raise UserError(f"{where}: input '{inp}' ({want.type_name}) is not wired; "
                                f"add inputs: {{{inp}: {form}}}")

    def _resolve(self, where: str, inp: str, want: type, ref, name: str) -> tuple[str, str]:
        """``stage`` or ``stage.output`` -> (stage, output), checked against the graph."""
        if not isinstance(ref, str) or not ref:
            raise UserError(f"{where}: input '{inp}' is {ref!r}; allowed: 'stage' or "
                            f"'stage.output'")
        up_name, _, out = ref.partition(".")
        if up_name not in self.nodes:
            others = [n for n in self.nodes if n != name]
            raise UserError(f"{where}: input '{inp}' names stage '{up_name}', which does not "
                            f"exist{did_you_mean(up_name, others)}; stages: {allowed_list(others)}")
        up_outputs = type(self.nodes[up_name].stage).outputs
        if not out:
            if len(up_outputs) == 1:
                out = next(iter(up_outputs))
            elif inp in up_outputs:
                out = inp
            else:
                raise UserError(f"{where}: input '{inp}': stage '{up_name}' has several outputs; "
                                f"name one as '{up_name}.<output>'; outputs: "
                                f"{allowed_list(up_outputs)}")
        if out not in up_outputs:
            raise UserError(f"{where}: input '{inp}': stage '{up_name}' has no output '{out}'"
                            f"{did_you_mean(out, up_outputs)}; outputs: {allowed_list(up_outputs)}")
        have = up_outputs[out]
        if not issubclass(have, want):
            raise UserError(f"{where}: input '{inp}' needs a {want.type_name}, but "
                            f"'{up_name}.{out}' is a {have.type_name}")
        return up_name, out

    def order(self) -> list[str]:
        """Stage names in a topological order (stable: ties keep insertion order)."""
        indeg = {n: 0 for n in self.nodes}
        children: dict[str, list[str]] = {n: [] for n in self.nodes}
        for n in self.nodes.values():
            for _, up, _ in n.wired():
                indeg[n.name] += 1
                children[up].append(n.name)
        ready = [n for n in self.nodes if indeg[n] == 0]
        out = []
        while ready:
            n = ready.pop(0)
            out.append(n)
            for c in children[n]:
                indeg[c] -= 1
                if indeg[c] == 0:
                    ready.append(c)
        if len(out) != len(self.nodes):
            raise UserError(f"pipeline '{self.name}': the inputs form a cycle: "
                            f"{' -> '.join(find_cycle(self))}")
        return out

    def upstream(self, name: str) -> set[str]:
        return {up for _, up, _ in self.nodes[name].wired()}

    def downstream(self, name: str) -> set[str]:
        """Every stage that depends on ``name``, directly or not."""
        out, frontier = set(), {name}
        while frontier:
            frontier = {n.name for n in self.nodes.values()
                        if self.upstream(n.name) & frontier} - out
            out |= frontier
        return out

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, stages={list(self.nodes)})"


def find_cycle(p: Pipeline) -> list[str]:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for _, up, _ in p.nodes[n].wired():
            if color.get(up) == 1:
                return stack[stack.index(up):] + [up]
            if up not in color:
                found = visit(up)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in p.nodes:
        if n not in color:
            found = visit(n)
            if found:
                return list(reversed(found))
    return []
