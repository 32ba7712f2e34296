"""Cache keys and the decision "cached or run, and why", as pure functions.

key = sha256(kind, version, keyed config, seed, input artifact keys, content checksums of
the local files the stage reads by path). The keyed config is the config without its
execution settings (``StageConfig.execution``: actors, workers, ...), which change how the
work runs, never what it makes. A stage is cached iff an artifact with its key is
committed and it is not forced, and the content it was made from is what its upstream
artifacts hold (``planner.fresh_decision``, and the scheduler once a stage above it that
re-runs under its old key commits). The *reason* it runs is found by comparing with the same
stage in the pipeline's previous run (Dagster's "why will this re-run"): config (which
fields), version, seed, an input or a file's content changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .tracking import redact


def canonical(obj) -> str:
    """Canonical JSON: sorted keys, no whitespace, floats in repr form."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(kind: str, version: str, config: dict, seed: int,
              inputs: dict[str, str | list[str]], contents: dict[str, str] | None = None) -> str:
    """``inputs`` maps input name -> '<upstream artifact key>/<output name>' (a list of
    them for a variadic input); ``contents``: config field -> checksum of the file or
    folder it names."""
    material = canonical({"kind": kind, "version": version, "config": config,
                          "seed": seed, "inputs": inputs, "contents": contents or {}})
    return hashlib.sha256(material.encode()).hexdigest()


def output_content(entry: dict) -> str:
    """The content of a committed output, from its manifest entry: sha256 over its files'
    sha256s, sorted (names left out: Ray Data names its parquet files afresh each write),
    and its ``info`` (which downstream stages read too)."""
    shas = sorted(f["sha256"] for f in entry.get("files", []))
    material = "\n".join(shas) + "\n" + canonical(entry.get("info", {}))
    return hashlib.sha256(material.encode()).hexdigest()


def input_refs(pipeline, name: str, manifests: dict) -> dict:
    """Per input of stage ``name``: the committed manifest it reads and which output (a
    variadic input: a list of (upstream stage, manifest, output)); the stage's task opens
    them on its node (``execute_stage``)."""
    return {inp: [(up, manifests[up], out) for up, out in wired] if isinstance(wired, list)
            else (manifests[wired[0]], wired[1])
            for inp, wired in pipeline.nodes[name].inputs.items()}


def input_content(refs: dict) -> dict:
    """Per input (``input_refs``), the ``output_content`` it reads (a list for a variadic
    input): what a manifest records of what its stage was made from."""
    def one(m, out):
        return output_content(m["outputs"][out])
    return {inp: [one(m, out) for _, m, out in ref] if isinstance(ref, list) else one(*ref)
            for inp, ref in refs.items()}


def fresh(manifest: dict, refs: dict) -> list[str]:
    """The inputs of a committed artifact (its ``manifest``) whose content differs from
    what it was made from; ``refs``: ``input_refs`` (the manifests committed now). An
    artifact that did not record its inputs' content counts as changed."""
    recorded = manifest.get("input_content")
    return [inp for inp, now in input_content(refs).items()
            if recorded is None or recorded.get(inp) != now]


@dataclass(frozen=True)
class StageState:
    """What determines a stage's artifact: everything that goes into its key."""
    name: str
    kind: str
    version: str
    config: dict             # the keyed config: without the execution settings
    seed: int
    inputs: dict[str, str | list[str]]   # input name -> upstream '<key>/<output>' (or a list)
    upstream: dict[str, str | list[str]] = field(default_factory=dict)  # -> upstream stage(s)
    execution: dict = field(default_factory=dict)  # execution settings: not in the key
    kept: dict[str, str] = field(default_factory=dict)  # execution fields kept in it, why
    contents: dict[str, str] = field(default_factory=dict)  # path field -> content checksum

    @property
    def key(self) -> str:
        return cache_key(self.kind, self.version, self.config, self.seed, self.inputs,
                         self.contents)

    def to_record(self) -> dict:
        """What run records keep of the state, and what a stage's task is given: the config
        with secret-looking values redacted (the key is computed from the real one)."""
        return asdict(self) | {"config": redact(self.config),
                               "execution": redact(self.execution), "key": self.key}


@dataclass(frozen=True)
class Decision:
    name: str
    key: str
    status: str        # "cached" | "run"
    reason: str
    forced: bool = False


def decide(state: StageState, committed: bool, forced: bool, previous: dict | None,
           upstream_running: set[str]) -> Decision:
    """Cached or run, and why. ``previous`` is this stage's record from the pipeline's
    last run (``StageState.to_record()``), ``upstream_running`` the upstream stages that
    will run in this plan."""
    key = state.key
    if forced:
        return Decision(state.name, key, "run", "forced (--force)", forced=True)
    if committed:
        changed = execution_diff(state, previous)
        if changed:
            return Decision(state.name, key, "cached", "artifact committed; execution settings "
                            f"changed ({', '.join(changed)}): cached artifact reused")
        return Decision(state.name, key, "cached", "artifact committed")
    return Decision(state.name, key, "run", why_changed(state, previous, upstream_running))


def execution_diff(state: StageState, previous: dict | None) -> list[str]:
    """The execution settings that differ from the previous run's (none if it did not
    record them)."""
    if not previous or "execution" not in previous:
        return []
    return config_diff(previous["execution"], state.to_record()["execution"])


def why_changed(state: StageState, previous: dict | None, upstream_running: set[str]) -> str:
    if previous is None:
        return "never run"
    reasons = []
    if previous.get("kind") != state.kind:
        reasons.append(f"kind changed: {previous.get('kind')} -> {state.kind}")
    if previous.get("version") != state.version:
        reasons.append(f"version changed: {previous.get('version')} -> {state.version}")
    diff = config_diff(previous.get("config", {}), state.to_record()["config"])
    diff = [d + (f" (an execution setting kept in the key: {state.kept[d.split()[0]]})"
                 if d.split()[0] in state.kept else "") for d in diff]
    if diff:
        reasons.append("config changed: " + ", ".join(diff))
    for f in sorted(state.contents):
        old = previous.get("contents", {}).get(f)
        if old is not None and old != state.contents[f]:
            reasons.append(f"content changed: the files '{f}' names")
    if previous.get("seed") != state.seed:
        reasons.append(f"seed changed: {previous.get('seed')} -> {state.seed}")
    changed_inputs = sorted(n for n, k in state.inputs.items()
                            if previous.get("inputs", {}).get(n) != k)
    for n in changed_inputs:
        ups = state.upstream.get(n, "?")
        for up in ups if isinstance(ups, list) else [ups]:
            how = "re-runs" if up in upstream_running else "changed"
            reasons.append(f"input changed: {n} (upstream '{up}' {how})")
    if not reasons and previous.get("key") not in (None, state.key):
        return "config changed: a value that is not shown (a secret-looking key)"
    if not reasons:
        return "artifact missing (deleted, or its run never committed)"
    return "; ".join(reasons)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two (nested) config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, path + "."))
        elif a != b:
            out.append(f"{path} {a!r} -> {b!r}")
    return out


def code_warning(name: str, manifest: dict, code_hash: str) -> str | None:
    """A warning when a cached artifact was built by different stage code under the same
    version: the cache is still used (versions decide), but the user is told."""
    built = manifest.get("code_hash")
    if built and code_hash and built != code_hash:
        return (f"stage '{name}' ({manifest['kind']}): its code changed since the cached "
                f"artifact was built, but version is still '{manifest['version']}'; "
                f"bump the stage's version or re-run it with --force {name}")
    return None


def should_retry(error_kind: str, attempt: int, max_retries: int) -> bool:
    """Retry, as configured by ``resources.max_retries``, a worker or node that died
    ('system') or an exception of the stage's code ('error'); never bad input ('user') or
    a deterministic failure such as a NaN loss, which would only fail again."""
    return error_kind in ("system", "error") and attempt < max_retries
