"""Pipeline files (YAML, read with ``yaml.safe_load``: no tags, no import strings) and
``--set stage.field=value`` overrides, both validated against the stage config models."""

from __future__ import annotations

import copy
import re
import os
from collections.abc import Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError, allowed_list, did_you_mean
from .validation import build_config


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class StageEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    config: dict = Field(default_factory=dict)
    inputs: dict[str, str | list[str]] = Field(default_factory=dict)  # a list: Many(...)
    resources: dict = Field(default_factory=dict)
    # a Model Registry name for the stage's student ("register" is a BaseModel attribute)
    registry_name: str | None = Field(None, alias="register")


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "pipeline"
    seed: int = 0
    stages: dict[str, StageEntry] = Field(min_length=1)


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"pipeline file {path!r} does not exist") from None
    except OSError as e:
        raise UserError(f"pipeline file {path!r} cannot be read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"pipeline file {path!r}: malformed YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"pipeline file {path!r}: expected a mapping with 'name', 'seed' and "
                        f"'stages', got {type(data).__name__}")
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return data


def pipeline_from_dict(spec: dict, overrides: Iterable[str] = (),
                       register: Iterable[str] = ()):
    from ..pipeline import Pipeline
    parsed = build_config(PipelineFile, spec, "pipeline file")
    entries = {n: e.model_copy(deep=True) for n, e in parsed.stages.items()}
    for item in overrides:
        apply_override(entries, item)
    p = Pipeline(parsed.name, parsed.seed)
    for name, e in entries.items():
        p._add(name, e.kind, e.config, e.inputs, e.resources or None)
    for name, e in entries.items():
        if e.registry_name is not None:
            p.register(name, e.registry_name)
    for item in register:  # --register STAGE=NAME
        stage, sep, model = item.partition("=")
        if not sep:
            raise UserError(f"--register {item!r} is not valid; allowed: STAGE=NAME")
        p.register(stage.strip(), model.strip())
    return p.validate()


def parse_value(text: str):
    """YAML scalar semantics, plus '1e-3' as a float (YAML 1.1 reads it as a string)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    return value


def apply_override(entries: dict, item: str) -> None:
    """Apply ``stage.field[.sub]=value`` to the raw entries; validated when the stage
    config is built."""
    lhs, eq, rhs = item.partition("=")
    if not eq or "." not in lhs:
        raise UserError(f"--set: {item!r} is not valid; expected stage.field=value")
    stage, path = lhs.split(".", 1)
    if stage not in entries:
        raise UserError(f"--set {item}: no stage '{stage}'{did_you_mean(stage, entries)}; "
                        f"stages: {allowed_list(entries)}")
    entry = entries[stage]
    from ..stage import get_stage_class
    cls = get_stage_class(entry.kind, f"stage '{stage}'")
    parts = path.split(".")
    fields = list(cls.Config.model_fields)
    if parts[0] not in fields:
        raise UserError(f"--set {item}: stage '{stage}' ({entry.kind}) has no config field "
                        f"'{parts[0]}'{did_you_mean(parts[0], fields)}; allowed fields: "
                        f"{allowed_list(fields)}")
    config = copy.deepcopy(entry.config)
    node = config
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {item}: '{p}' is not a nested config")
    node[parts[-1]] = parse_value(rhs)
    entry.config = config
