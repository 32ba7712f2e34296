"""The ``distill`` command line's arguments: one subparser per command (``pipelines.cli``
runs them). argparse's own errors are ``UserError`` s, so they print as one line, exit 2."""

from __future__ import annotations

import argparse
import os

from ..errors import UserError

DEFAULT_STORE = os.environ.get("DISTILL_STORE", ".distill")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same style, exit 2
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distill", description="Ray-based orchestrator for distillation pipelines.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def pipeline_args(sp, with_address):
        sp.add_argument("config", help="pipeline YAML file")
        sp.add_argument("--store", default=DEFAULT_STORE, help="artifact store (default .distill)")
        sp.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="STAGE.FIELD=VALUE", help="override a stage config field")
        sp.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="re-run this stage even if cached")
        sp.add_argument("--json", action="store_true", help="print one JSON document")
        if with_address:
            sp.add_argument("--address", default=None,
                            help="Ray address ('auto' on a cluster head); default: embedded Ray")
            sp.add_argument("--tracking-uri", default=None,
                            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the store)")
            sp.add_argument("--quiet", action="store_true", help="no progress lines")
            sp.add_argument("--register", action="append", default=[], metavar="STAGE=NAME",
                            help="register the stage's student as a Model Registry version "
                                 "of NAME (one version per artifact)")

    pipeline_args(sub.add_parser("run", help="run a pipeline"), True)
    pipeline_args(sub.add_parser("plan", help="show what run would do, and why"), False)
    sp = sub.add_parser("ls", help="list committed artifacts")
    sp.add_argument("--store", default=DEFAULT_STORE)
    sp.add_argument("--json", action="store_true")
    for name, help_ in (("show", "show an artifact's manifest or a run"),
                        ("lineage", "show the artifacts an artifact was built from")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("ref", help="artifact key (a unique prefix) or run id")
        sp.add_argument("--store", default=DEFAULT_STORE)
    sp = sub.add_parser("gc", help="remove uncommitted debris (and optionally unreferenced artifacts)")
    sp.add_argument("--store", default=DEFAULT_STORE)
    sp.add_argument("--unreferenced", action="store_true",
                    help="also remove committed artifacts no pipeline's last run uses")
    sp.add_argument("--dry-run", action="store_true")
    sp = sub.add_parser("verify", help="re-hash committed artifacts against their manifests")
    sp.add_argument("ref", nargs="?", default=None, metavar="KIND|KEY-PREFIX",
                    help="only the artifacts of this kind, or whose key starts with this")
    sp.add_argument("--store", default=DEFAULT_STORE)
    sp.add_argument("--repair", action="store_true", help="remove the damaged artifacts, so "
                    "the next run makes them again (exit 0 once none is left)")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp = sub.add_parser("submit", help="run a pipeline as a Ray Job on a cluster")
    sp.add_argument("config", help="pipeline YAML file, inside --working-dir")
    sp.add_argument("--address", default=None,
                    help="the head's Ray dashboard, e.g. http://HEAD:8265 (default RAY_ADDRESS)")
    sp.add_argument("--store", default=None, help="artifact store as the cluster sees it: "
                    "an absolute path every node shares, or s3://bucket/prefix (required)")
    sp.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="STAGE.FIELD=VALUE", help="override a stage config field")
    sp.add_argument("--force", action="append", default=[], metavar="STAGE",
                    help="re-run this stage even if cached")
    sp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for the job")
    sp.add_argument("--working-dir", default=".",
                    help="directory uploaded with the job (default: the current one)")
    sp.add_argument("--follow", action="store_true",
                    help="stream the job's logs and exit with its status")
    tune_args(sub.add_parser("tune", help="Ray Tune sweep over stage config fields"))
    sp = sub.add_parser("kinds", help="list the installed stage kinds and their packages")
    sp.add_argument("--check", action="store_true",
                    help="also import every kind and report those that do not load")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp = sub.add_parser("export", help="write a committed student with its model card")
    sp.add_argument("config", help="pipeline YAML file")
    sp.add_argument("stage", help="the student's stage")
    sp.add_argument("--to", required=True, metavar="DIR", help="a new (or empty) folder")
    sp.add_argument("--store", default=DEFAULT_STORE, help="artifact store (default .distill)")
    sp.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="STAGE.FIELD=VALUE", help="the overrides the run used")
    sp = sub.add_parser("ui", help="the MLflow UI on the store's tracking database")
    sp.add_argument("--store", default=DEFAULT_STORE, help="artifact store (default .distill)")
    sp.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    return p


def tune_args(sp) -> None:
    from ..sweep import SCHEDULERS, SEARCHERS
    sp.add_argument("config", help="pipeline YAML file")
    sp.add_argument("--space", required=True, metavar="SPACE.yaml",
                    help="search space: 'stage.field: {uniform|loguniform|randint: [a, b]} "
                         "| {choice|grid: [...]}'")
    sp.add_argument("--metric", required=True, metavar="STAGE.METRIC",
                    help="the metric to optimise, as logged by a stage")
    sp.add_argument("--mode", required=True, choices=["max", "min"])
    sp.add_argument("--samples", type=int, default=None,
                    help="trials (default 10; 1 for an all-grid space)")
    sp.add_argument("--scheduler", choices=SCHEDULERS, default="asha",
                    help="asha stops bad trials early on per-epoch metrics (default asha)")
    sp.add_argument("--search", choices=SEARCHERS, default="random")
    sp.add_argument("--max-concurrent", type=int, default=None, metavar="K",
                    help="at most K trials at once (default: half the cluster's CPUs)")
    sp.add_argument("--store", default=DEFAULT_STORE, help="artifact store (default .distill)")
    sp.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="STAGE.FIELD=VALUE", help="override a stage config field")
    sp.add_argument("--address", default=None,
                    help="Ray address ('auto' on a cluster head); default: embedded Ray")
    sp.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the store)")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.add_argument("--quiet", action="store_true", help="no progress lines")
