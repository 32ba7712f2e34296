"""The ``distill`` command line.

    distill run CONFIG [--store URI] [--set stage.field=value ...] [--force STAGE]
                       [--address ADDR] [--json]
    distill plan CONFIG [--store URI] [--set ...] [--force STAGE] [--json]
    distill ls [--store URI] [--json]
    distill show ARTIFACT_OR_RUN [--store URI]
    distill lineage ARTIFACT [--store URI]
    distill gc [--store URI] [--unreferenced] [--dry-run]
    distill verify [KIND|KEY-PREFIX] [--store URI] [--repair] [--json]
    distill submit CONFIG --address http://HEAD:8265 [--store URI] [--set ...]
                   [--force STAGE] [--working-dir DIR] [--follow]
    distill tune CONFIG --space SPACE.yaml --metric STAGE.METRIC --mode max|min
                 [--samples N] [--scheduler asha|fifo] [--search random|optuna|hyperopt]
                 [--max-concurrent K] [--store URI] [--set ...] [--address ADDR] [--json]
    distill kinds [--check] [--json]
    distill export CONFIG STAGE --to DIR [--store URI] [--set ...]
    distill ui [--store URI] [--port P]

User mistakes print one message (no traceback) and exit 2; a failed stage exits 1.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys

from . import _internal  # noqa: F401  (applies environment defaults first)
from ._internal.cli_args import build_parser
from .errors import StageFailed, UserError

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.user_error else 1
    except KeyboardInterrupt:
        print("interrupted; committed stages are kept and reused on the next run",
              file=sys.stderr)
        return 130


def _load(args):
    from .pipeline import Pipeline
    return Pipeline.from_yaml(args.config, args.overrides, getattr(args, "register", ()))


def _resume_command(argv: list[str]) -> str:
    """The command that resumes a run: ``argv`` without its ``--force``, and secret-looking
    ``--set`` values shown as ``***``."""
    from ._internal.tracking import redact_override
    out, skip, after_set = [], False, False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--force":
            skip = True
            continue
        if a.startswith("--force="):
            continue
        if after_set:
            a = redact_override(a)
        elif a.startswith("--set="):
            a = "--set=" + redact_override(a[len("--set="):])
        after_set = a == "--set"
        out.append(a)
    return "distill " + shlex.join(out)


def cmd_run(args, argv) -> int:
    from ._internal.progress import results_table
    from ._internal.runner import run
    pipeline = _load(args)
    stdout = sys.stdout
    # Ray prints its own warnings (e.g. from the raylet) on the driver's stdout; with
    # --json, stdout holds the one JSON document and nothing else.
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else stdout):
            result = run(pipeline, store=args.store, force=args.force, address=args.address,
                         tracking_uri=args.tracking_uri, progress=not args.quiet,
                         command=_resume_command(argv))
    except StageFailed as e:
        if args.json and e.result is not None:  # what ran, what was cached, what failed
            print(json.dumps(e.result.to_json(), indent=2), file=stdout)
        raise
    if args.json:
        print(json.dumps(result.to_json(), indent=2), file=stdout)
    else:
        results_table(result)
    return 0


def cmd_plan(args, argv) -> int:
    from ._internal.runner import plan
    p = plan(_load(args), store=args.store, force=args.force)
    if args.json:
        print(json.dumps(p.to_json(), indent=2))
        return 0
    for w in p.warnings:
        print(f"warning: {w}", file=sys.stderr)
    width = max(len(n) for n in p.decisions)
    for name, d in p.decisions.items():
        status = "cached" if d.status == "cached" else "to run"
        print(f"{name:<{width}}  {p.states[name].kind:<22} {status:<7} {d.key[:12]}  {d.reason}")
    return 0


def _store(args, create=False):
    from ._internal.store import Store
    return Store.open(args.store, create=create)


def cmd_ls(args, argv) -> int:
    rows = sorted(_store(args).manifests(), key=lambda m: m.get("created", 0))
    if args.json:
        print(json.dumps([{k: m.get(k) for k in ("key", "kind", "stage", "pipeline", "created")}
                          for m in rows], indent=2))
        return 0
    if not rows:
        print(f"no committed artifacts in {_store(args).root}")
    for m in rows:
        size = sum(o.get("bytes", 0) for o in m["outputs"].values())
        outs = ", ".join(f"{n}:{o['type']}" + (f"[{o['rows']} rows]" if "rows" in o else "")
                         for n, o in m["outputs"].items())
        print(f"{m['key'][:12]}  {m['kind']:<22} {m.get('stage', ''):<16} {size / 1e6:8.2f} MB  {outs}")
    return 0


def _find(store, ref: str) -> dict:
    for r in store.runs():
        if r["run_id"] == ref:
            return {"run": r}
    matches = store.find(ref) if len(ref) >= 4 else []
    if len(matches) == 1:
        return {"artifact": matches[0]}
    if len(matches) > 1:
        raise UserError(f"'{ref}' matches {len(matches)} artifacts; give more characters of the key")
    raise UserError(f"no artifact key or run id '{ref}' in store {store.root}; "
                    f"see `distill ls --store {store.root}`")


def cmd_show(args, argv) -> int:
    found = _find(_store(args), args.ref)
    print(json.dumps(found.get("artifact") or found["run"], indent=2, default=str))
    return 0


def cmd_lineage(args, argv) -> int:
    store = _store(args)
    found = _find(store, args.ref)
    if "artifact" not in found:
        raise UserError(f"lineage takes an artifact key; '{args.ref}' is a run id")
    by_key = {m["key"]: m for m in store.manifests()}

    def walk(m: dict, depth: int, via: str) -> None:
        print(f"{'  ' * depth}{via}{m['kind']} {m['key'][:12]} (stage '{m.get('stage')}', "
              f"version {m['version']})")
        for inp, refs in sorted(m.get("inputs", {}).items()):
            for ref in refs if isinstance(refs, list) else [refs]:  # a list: Many(...)
                key, _, out = ref.partition("/")
                up = by_key.get(key)
                if up is None:
                    print(f"{'  ' * (depth + 1)}{inp} <- {key[:12]}/{out} (not in store)")
                else:
                    walk(up, depth + 1, f"{inp} <- {out} of ")

    walk(found["artifact"], 0, "")
    return 0


def cmd_gc(args, argv) -> int:
    from ._internal.gc import collect
    removed, freed = collect(_store(args), unreferenced=args.unreferenced, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(removed)} paths, {freed / 1e6:.2f} MB")
    return 0


def cmd_verify(args, argv) -> int:
    from ._internal.verify import verify_command
    return verify_command(args.store, args.ref, args.repair, args.json, sys.stdout)


def cmd_tune(args, argv) -> int:
    from .sweep import print_table, sweep
    pipeline = _load(args)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if args.json else stdout):
        result = sweep(pipeline, args.space, args.metric, args.mode, samples=args.samples,
                       scheduler=args.scheduler, search=args.search,
                       max_concurrent=args.max_concurrent, store=args.store,
                       address=args.address, tracking_uri=args.tracking_uri,
                       progress=not args.quiet)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, default=str), file=stdout)
    else:
        print_table(result)
    if result.best is None:
        failed = [t for t in result.trials if t.status == "failed"]
        why = f"; first failure: trial {failed[0].trial_id}: {failed[0].error}" if failed else ""
        print(f"error: no trial completed{why}", file=sys.stderr)
        return 1
    return 0


def cmd_submit(args, argv) -> int:
    from ._internal.submit import submit
    return submit(args.config, args.address, args.store, args.overrides, args.force,
                  args.tracking_uri, args.working_dir, args.follow, sys.stdout)


def cmd_kinds(args, argv) -> int:
    """Every kind of the installed entry points (group ``distillery.stages``), read from
    the packages' metadata without importing them; ``--check`` imports each one."""
    from ._internal import plugins
    problems = plugins.check() if args.check else plugins.conflicts()
    rows = [c.to_json() for found in plugins.claims().values() for c in found]
    print(json.dumps(rows, indent=2) if args.json else plugins.table(rows))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return UserError.exit_code if problems else 0


def cmd_export(args, argv) -> int:
    from ._internal.outputs import export_command
    return export_command(_load(args), args.config, args.stage, args.to, args.store, sys.stdout)


def cmd_ui(args, argv) -> int:
    from ._internal.outputs import ui_command
    return ui_command(args.store, args.port, sys.stdout)


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "ls": cmd_ls, "show": cmd_show,
            "lineage": cmd_lineage, "gc": cmd_gc, "tune": cmd_tune, "submit": cmd_submit,
            "kinds": cmd_kinds, "verify": cmd_verify, "export": cmd_export, "ui": cmd_ui}


if __name__ == "__main__":
    sys.exit(main())
