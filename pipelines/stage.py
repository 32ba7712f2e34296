"""Stages: the unit of work of a pipeline.

A stage is a class with a registered ``kind`` (its name in YAML), a ``version`` (bump it
when behaviour changes: it is part of the cache key), a typed ``Config`` (pydantic, unknown
keys rejected), declared ``inputs`` / ``outputs`` (name -> artifact type; ``optional_inputs`` may be left
unwired) and the
``resources`` of its coordinator Ray task::

    class Square(Stage):
        kind = "square"
        version = "1"

        class Config(StageConfig):
            power: int = 2

        inputs = {"data": Dataset}
        outputs = {"data": Dataset}

        def run(self, ctx, data):
            ds = data.read().map_batches(lambda b: {"x": b["x"] ** self.config.power})
            return {"data": ctx.write_dataset("data", ds)}

A stage never builds storage paths, opens MLflow runs or calls ``ray.init``: the context
(``pipelines.context.StageContext``) gives it output locations, a metric logger, a
progress reporter and a seed. ``Stage(config).run(ctx, **inputs)`` works in a unit test.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_jsonable_python

from .artifacts import Artifact, Dataset, Model, Report  # noqa: F401  (re-exported)
from .errors import UserError, allowed_list, did_you_mean


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, values are validated on
    assignment, and a config is immutable once built (it is part of a cache key).

    ``execution`` names the fields that change only how the work runs (actors, threads,
    inference batch size, workers), never what it makes: they are left out of the cache
    key, and ``plan`` shows their changes apart ("cached artifact reused"). Mixins add
    theirs: a config's execution fields are those of every class it derives from. A config
    whose maths does depend on one of them for some values (per-worker BatchNorm
    statistics, noise drawn on each worker) names it in ``keyed_execution``, with why:
    that field then stays in the key.

    ``added`` names fields added to a kind after its artifacts existed, whose default keeps
    what the kind computed before: at its default such a field is left out of the key, so
    the artifacts already in a store stay cache hits; any other value is keyed as usual."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    execution: ClassVar[tuple[str, ...]] = ()
    added: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def execution_fields(cls) -> tuple[str, ...]:
        seen: list[str] = []
        for klass in reversed(cls.__mro__):
            for name in klass.__dict__.get("execution", ()):
                if name not in seen:
                    seen.append(name)
        return tuple(seen)

    @classmethod
    def added_fields(cls) -> tuple[str, ...]:
        return tuple(n for klass in reversed(cls.__mro__) for n in klass.__dict__.get("added", ()))

    def keyed_execution(self) -> dict[str, str]:
        """Execution fields this config keeps in its key, each with the reason."""
        return {}

    def split_execution(self) -> tuple[dict, dict, dict[str, str]]:
        """(the keyed config, the execution settings left out of it, the execution fields
        kept in it with why), as JSON values."""
        values = self.model_dump(mode="json")
        for name in self.added_fields():
            field = type(self).model_fields[name]
            if values[name] == to_jsonable_python(field.get_default(call_default_factory=True)):
                values.pop(name)
        kept = {k: v for k, v in self.keyed_execution().items() if k in values}
        execution = {k: values.pop(k) for k in self.execution_fields() if k not in kept}
        return values, execution, kept


class Resources(BaseModel):
    """What the stage's coordinator Ray task reserves.

    A stage that only launches Ray Data or Ray Train work must reserve ``num_cpus=0``,
    or it starves the work it launched (see RAY_NOTES.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_retries: int = Field(0, ge=0)


class Many:
    """A variadic input: any number of artifacts of one type, wired in YAML as a list of
    references (``students: [one_step, two_step]``). ``run`` gets a dict, upstream stage
    name -> artifact, in the order wired::

        inputs = {"students": Many(Model)}
    """

    def __init__(self, type_: type[Artifact]):
        if not (isinstance(type_, type) and issubclass(type_, Artifact)):
            raise TypeError(f"Many({type_!r}): the type must be an Artifact type")
        self.type = type_

    @property
    def type_name(self) -> str:
        return f"list of {self.type.type_name}s"

    def __repr__(self) -> str:
        return f"Many({self.type.__name__})"


_REGISTRY: dict[str, type[Stage]] = {}


class Stage:
    kind: ClassVar[str]
    version: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    inputs: ClassVar[dict[str, type[Artifact]]] = {}
    # inputs a pipeline may leave unwired: ``run`` then gets no such argument (give it a
    # default) and the cache key has no such input
    optional_inputs: ClassVar[dict[str, type[Artifact]]] = {}
    outputs: ClassVar[dict[str, type[Artifact]]] = {}
    resources: ClassVar[Resources] = Resources()
    # names of the metrics ``run`` logs (``ctx.log_metrics`` / ``ctx.write_report``);
    # sweeps check ``--metric STAGE.METRIC`` against it before any trial. Empty: undeclared.
    metrics: ClassVar[tuple[str, ...]] = ()
    # Model outputs that are students a user deploys: at commit the core writes each as an
    # MLflow Model, from ``mlflow_model`` (``pipelines.mlmodel``); only such stages can be
    # registered (``register:``) and exported
    mlflow_outputs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:  # abstract intermediate class
            return
        _check_declaration(cls)
        register(cls)

    def __init__(self, config: StageConfig | dict | None = None):
        if isinstance(config, self.Config):
            self.config = config
        else:
            self.config = self.Config(**(config or {}))

    def run(self, ctx, **inputs) -> dict[str, Artifact]:  # pragma: no cover - abstract
        raise NotImplementedError

    def mlflow_model(self, output: str, artifact: Model):
        """The ``pipelines.mlmodel.PyFunc`` of the Model output ``output`` (one of
        ``mlflow_outputs``), as ``run`` returned it."""
        raise NotImplementedError(f"{type(self).__name__} lists mlflow_outputs but does not "
                                  f"define mlflow_model")

    def content_paths(self) -> dict[str, str]:
        """Local files or folders this stage reads by path (a model folder, a prompt file),
        by config field: a checksum of their content enters the cache key, so an edited
        folder re-runs the stage. Default: none."""
        return {}

    # -- helpers used by the core ---------------------------------------------------
    @classmethod
    def code_hash(cls) -> str:
        """sha256 of the source file defining the stage: used to warn when code changed
        but ``version`` did not (never to decide a cache hit)."""
        try:
            src = inspect.getsource(inspect.getmodule(cls))
        except (OSError, TypeError):
            return ""
        return hashlib.sha256(src.encode()).hexdigest()[:16]


def _check_declaration(cls: type[Stage]) -> None:
    where = f"stage class {cls.__qualname__}"
    for attr in ("kind", "version"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise TypeError(f"{where}: '{attr}' must be a non-empty string")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, StageConfig)):
        raise TypeError(f"{where}: Config must subclass pipelines.StageConfig")
    for side in ("inputs", "optional_inputs", "outputs"):
        for name, typ in getattr(cls, side).items():
            if side != "outputs" and isinstance(typ, Many):
                continue
            if not (isinstance(typ, type) and issubclass(typ, Artifact)):
                raise TypeError(f"{where}: {side}[{name!r}] must be an Artifact type"
                                f"{'' if side == 'outputs' else ' or Many(type)'}, got {typ!r}")
    fields = cls.Config.model_fields
    for name in cls.Config.execution_fields():
        if name not in fields:
            raise TypeError(f"{where}: Config.execution names '{name}', which is not a field "
                            f"of {cls.Config.__qualname__}; fields: {allowed_list(fields)}")
    if not cls.outputs:
        raise TypeError(f"{where}: a stage declares at least one output")
    for name in cls.mlflow_outputs:
        if not (isinstance(cls.outputs.get(name), type) and issubclass(cls.outputs[name], Model)):
            raise TypeError(f"{where}: mlflow_outputs names '{name}', which is not a Model "
                            f"output; Model outputs: "
                            f"{allowed_list(n for n, t in cls.outputs.items() if t is Model)}")
    both = sorted(set(cls.inputs) & set(cls.optional_inputs))
    if both:
        raise TypeError(f"{where}: {both} declared both in inputs and in optional_inputs")


def register(cls: type[Stage]) -> type[Stage]:
    """Register a stage class under its kind. Registering a *different* class under a
    kind that is taken is an error: a registry never silently overwrites."""
    old = _REGISTRY.get(cls.kind)
    if old is not None and old is not cls:
        same_def = (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
        if not same_def:  # re-import of the same module (e.g. cloudpickle) is fine
            raise TypeError(f"stage kind '{cls.kind}' is already registered by "
                            f"{old.__module__}.{old.__qualname__}; "
                            f"cannot register {cls.__module__}.{cls.__qualname__}")
    _REGISTRY[cls.kind] = cls
    return cls


def unregister(kind: str) -> None:
    """Remove a kind (for tests that define throw-away stages)."""
    _REGISTRY.pop(kind, None)


def registry() -> dict[str, type[Stage]]:
    """Every kind -> its class: the kind of every installed entry point (group
    ``distillery.stages``: the built-in catalog and every plugin, so this imports them all)
    and the classes defined directly (a test's throw-away stages)."""
    from ._internal import plugins
    for kind in plugins.kinds():
        get_stage_class(kind, "stage registry")
    return dict(_REGISTRY)


def get_stage_class(kind: str, where: str = "pipeline") -> type[Stage]:
    """The class of ``kind``: one defined directly, or the one its entry point names,
    importing that entry point's module only (``pipelines._internal.plugins``)."""
    from ._internal import plugins
    problem = plugins.conflict(kind)
    if problem is not None:
        raise UserError(f"{where}: {problem}")
    cls = _REGISTRY.get(kind)
    if cls is not None and (kind not in plugins.claims() or plugins.names_class(kind, cls)):
        return cls
    if cls is None and kind not in plugins.claims():
        known = set(_REGISTRY) | set(plugins.kinds())
        raise UserError(f"{where}: unknown stage kind {kind!r}{did_you_mean(kind, known)}; "
                        f"known kinds: {allowed_list(known)}{plugins.missing_hint()}")
    loaded = plugins.load(kind, where)  # also what a class defined directly must be
    if cls is not None and loaded is not cls:
        raise UserError(f"{where}: stage kind '{kind}' is defined by {cls.__module__}."
                        f"{cls.__qualname__} and by the entry point of an installed package, "
                        f"{loaded.__module__}.{loaded.__qualname__}; rename one of them")
    return loaded
