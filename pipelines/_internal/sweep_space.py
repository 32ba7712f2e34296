"""Search spaces of sweeps: a mapping ``stage.field: {distribution: values}``, checked
against the pipeline's stage configs before any trial starts.

    student.temperature: {uniform: [1, 8]}
    student.lr: {loguniform: [1e-4, 1e-1]}
    student.hidden: {choice: [[32], [64]]}
    student.epochs: {randint: [3, 10]}         # both ends included
    distill.ipc: {grid: [1, 10, 50]}           # every value, in every sample

Every key must name a config field of a stage (``stage.field`` or ``stage.field.sub`` for a
nested config); every value a distribution can draw must pass the field's validation:
the ends of ``uniform`` / ``loguniform`` / ``randint`` and their midpoint (so a float range
on an integer field is caught), and every value of ``choice`` / ``grid``.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import yaml

from ..errors import UserError, allowed_list, did_you_mean
from .config_file import _FLOAT
from .validation import build_config, fields_of

RANGES = ("uniform", "loguniform", "randint")
LISTS = ("choice", "grid")
DISTRIBUTIONS = RANGES + LISTS


@dataclass(frozen=True)
class Param:
    key: str            # 'stage.field[.sub]'
    stage: str
    path: tuple[str, ...]
    dist: str           # one of DISTRIBUTIONS
    values: tuple       # (low, high) for ranges, the values for choice / grid

    def tune_domain(self):
        from ray import tune
        if self.dist == "uniform":
            return tune.uniform(*self.values)
        if self.dist == "loguniform":
            return tune.loguniform(*self.values)
        if self.dist == "randint":  # Tune's upper bound is exclusive; ours is included
            return tune.randint(self.values[0], self.values[1] + 1)
        if self.dist == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def candidates(self) -> list:
        """The values whose validity stands for the whole distribution."""
        if self.dist in LISTS:
            return list(self.values)
        low, high = self.values
        if self.dist == "randint":
            return [low, high]
        mid = math.sqrt(low * high) if self.dist == "loguniform" else (low + high) / 2
        return [low, mid, high]


def load_space(space, where: str = "--space") -> dict:
    """A space from a YAML file path or a dict."""
    if isinstance(space, dict):
        return space
    if not isinstance(space, (str, os.PathLike)):
        raise UserError(f"{where}: {space!r} is not valid; expected a YAML file or a mapping")
    try:
        with open(space) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"{where}: search space file {str(space)!r} cannot be read "
                        f"({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{where}: search space file {str(space)!r}: malformed YAML{at}: "
                        f"{getattr(e, 'problem', None) or e}") from None


def _number(v):
    """'1e-3' (a string for YAML 1.1) as a float; other values unchanged."""
    if isinstance(v, str) and _FLOAT.match(v):
        return float(v)
    return v


def parse_space(space: dict, pipeline, where: str = "--space") -> list[Param]:
    """Check every key and distribution against ``pipeline``'s stage configs."""
    if not isinstance(space, dict) or not space:
        raise UserError(f"{where}: the search space is empty or not a mapping; expected "
                        f"'stage.field: {{distribution: values}}' entries, distributions: "
                        f"{allowed_list(DISTRIBUTIONS)}")
    params = [_parse_entry(str(key), spec, pipeline, where) for key, spec in space.items()]
    for p in params:
        for value in p.candidates():
            check_value(pipeline, p, value, where)
    return params


def _parse_entry(key: str, spec, pipeline, where: str) -> Param:
    stage, _, path = key.partition(".")
    if stage not in pipeline.nodes:
        raise UserError(f"{where}: key '{key}' names no stage '{stage}'"
                        f"{did_you_mean(stage, pipeline.nodes)}; stages: "
                        f"{allowed_list(pipeline.nodes)}")
    node = pipeline.nodes[stage]
    model = type(node.stage).Config
    parts = tuple(path.split(".")) if path else ()
    if not parts:
        raise UserError(f"{where}: key '{key}' names no field; expected '{stage}.<field>', "
                        f"fields: {allowed_list(model.model_fields)}")
    for i, part in enumerate(parts):
        allowed = fields_of(model, parts[:i])
        if part not in allowed:
            field = ".".join(parts[:i + 1])
            raise UserError(f"{where}: key '{key}': stage '{stage}' ({node.kind}) has no config "
                            f"field '{field}'{did_you_mean(part, allowed)}; allowed fields: "
                            f"{allowed_list(allowed)}")
    execution, kept = model.execution_fields(), node.stage.config.keyed_execution()
    if parts[0] in execution and parts[0] not in kept:
        raise UserError(f"{where}: key '{key}': '{parts[0]}' is an execution setting of "
                        f"{node.kind}: it changes how the stage runs, not what it makes (not in "
                        f"its cache key), so every trial would share one artifact; allowed: "
                        f"a field other than {allowed_list(execution)}, or set it with --set")
    w = f"{where}: key '{key}'"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{w}: {spec!r} is not a distribution; expected one of "
                        f"{{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}")
    dist, values = next(iter(spec.items()))
    if dist not in DISTRIBUTIONS:
        raise UserError(f"{w}: unknown distribution {dist!r}{did_you_mean(dist, DISTRIBUTIONS)}; "
                        f"allowed: {allowed_list(DISTRIBUTIONS)}")
    if not isinstance(values, list) or not values:
        raise UserError(f"{w}: {dist} takes a non-empty list, got {values!r}")
    values = [_number(v) for v in values]
    if dist in RANGES:
        _check_range(w, dist, values)
    return Param(key, stage, parts, dist, tuple(values))


def _check_range(w: str, dist: str, values: list) -> None:
    kind = int if dist == "randint" else (int, float)
    if (len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, kind) for v in values)):
        what = "integers" if dist == "randint" else "numbers"
        raise UserError(f"{w}: {dist} takes [low, high], two {what}; got {values!r}")
    low, high = values
    if not low < high:
        raise UserError(f"{w}: {dist} [{low}, {high}]: low must be below high")
    if dist == "loguniform" and low <= 0:
        raise UserError(f"{w}: loguniform [{low}, {high}]: low must be above 0")


def set_path(config: dict, path: tuple[str, ...], value) -> None:
    node = config
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = copy.deepcopy(value)


def check_value(pipeline, p: Param, value, where: str = "--space") -> None:
    """Build the stage's config with ``value`` at the field: a UserError if it fails."""
    node = pipeline.nodes[p.stage]
    config = node.stage.config.model_dump()
    set_path(config, p.path, value)
    try:
        build_config(type(node.stage).Config, config, f"stage '{p.stage}' ({node.kind})")
    except UserError as e:
        raise UserError(f"{where}: key '{p.key}': {p.dist} value {value!r} fails the field's "
                        f"validation: {e}") from None


def apply_params(pipeline, params: dict):
    """The pipeline with ``{'stage.field': value}`` set (a new, validated Pipeline)."""
    from ..pipeline import Pipeline
    spec = pipeline.to_dict()
    for key, value in params.items():
        stage, _, path = key.partition(".")
        set_path(spec["stages"][stage]["config"], tuple(path.split(".")), value)
    return Pipeline.from_dict(spec)


def max_epochs(pipeline, params: list[Param], stage: str) -> int:
    """ASHA's horizon: the metric stage's ``epochs`` (the largest the space allows)."""
    cfg = pipeline.nodes[stage].stage.config
    values = [getattr(cfg, "epochs", None)]
    for p in params:
        if p.stage == stage and p.path == ("epochs",):
            values += list(p.values)
    values = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return max(values) if values else 100
