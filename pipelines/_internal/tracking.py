"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Only the driver talks to MLflow. Default: a sqlite database inside the store (an absolute
``sqlite:////...`` URI, since Ray changes working directories), artifacts next to it. For
a remote store (``s3://``) the database is in the driver's cache of that store and the
artifacts on the store, under ``mlflow/artifacts``. ``MLFLOW_TRACKING_URI`` (or
``tracking_uri=``) points runs at a server instead.

Configs are logged with the values of secret-looking keys (``redact``) replaced.
"""

from __future__ import annotations

import os
import re
import time

from ..errors import UserError

SECRET_ENDINGS = (("secret",), ("password",), ("passwd",), ("token",), ("credential",),
                  ("credentials",), ("apikey",), ("api", "key"), ("access", "key"),
                  ("secret", "key"), ("private", "key"))
REDACTED = "***"


def looks_secret(key: str) -> bool:
    """Whether a config key names a secret: its words (split at '_', '-', '.' and case
    changes) end with one of ``SECRET_ENDINGS`` ('HF_TOKEN', 'aws_secret_access_key',
    'apiKey'; not 'tokenizer' or 'max_tokens')."""
    words = tuple(w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", key))
    return any(words[-len(end):] == end for end in SECRET_ENDINGS)


def redact(value):
    """``value`` (nested dicts and lists) with every non-empty value under a key that
    ``looks_secret`` replaced by ``REDACTED``: for what is logged or written to the store;
    the cache key is computed from the real config."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and looks_secret(k) and v not in (None, "")
                else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def redact_override(item: str) -> str:
    """A ``--set stage.field=value`` item as it may be shown: the value as ``REDACTED`` when
    the field looks secret."""
    field, sep, value = item.partition("=")
    secret = sep and value and looks_secret(field.rsplit(".", 1)[-1])
    return f"{field}={REDACTED}" if secret else item


def _remote(store_root: str) -> bool:
    return "://" in store_root and not store_root.startswith("file://")


def default_tracking_uri(store_root: str) -> str:
    if _remote(store_root):
        from .remote_store import cache_root
        return "sqlite:///" + os.path.join(cache_root(store_root), "mlflow", "mlflow.db")
    return "sqlite:///" + os.path.join(os.path.abspath(store_root), "mlflow", "mlflow.db")


def artifact_location(store_root: str) -> str:
    if _remote(store_root):
        return f"{store_root}/mlflow/artifacts"
    return "file://" + os.path.join(os.path.abspath(store_root), "mlflow", "artifacts")


def resolve_tracking_uri(store_root: str, explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(store_root)
    if uri.startswith("file:") or (":" not in uri.split("/")[0] and "://" not in uri):
        raise UserError(f"tracking URI {uri!r} is not supported by MLflow 3 (file stores are "
                        f"in maintenance mode); allowed: sqlite:////absolute/path.db, "
                        f"http(s)://server, databricks")
    return uri


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def _template_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distillery")


def seed_sqlite(path: str) -> bool:
    """Create the new sqlite tracking database ``path`` as a copy of an empty one at the
    installed MLflow's schema head, kept per MLflow version in the user's cache directory
    (made once by MLflow itself): MLflow's own set-up of a new database runs every schema
    migration, seconds per new store. The copy is linked into place only if ``path`` still
    does not exist, so a database another run created meanwhile is never replaced. Returns
    False, leaving MLflow to create the database, where the cache cannot be used."""
    import shutil
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient
    try:
        cache = _template_dir()
        os.makedirs(cache, exist_ok=True)
        template = os.path.join(cache, f"mlflow-{mlflow.__version__}-empty.db")
        if not os.path.exists(template):
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".db")
            os.close(fd)
            os.remove(tmp)  # sqlite creates it
            MlflowClient(tracking_uri="sqlite:///" + tmp).search_experiments()
            os.replace(tmp, template)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".db.tmp")
        os.close(fd)
        shutil.copyfile(template, tmp)
        try:
            os.link(tmp, path)  # fails if the database exists by now
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
        return True
    except OSError:
        return False


class Tracker:
    def __init__(self, uri: str, experiment: str, store_root: str):
        import logging

        from mlflow.tracking import MlflowClient  # configures mlflow's loggers on import
        for name in ("mlflow", "alembic"):  # database set-up chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        if uri.startswith("sqlite:///"):
            path = uri[len("sqlite:///"):]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path):
                seed_sqlite(path)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            self.experiment_id = self._experiment(experiment, store_root)
        except Exception as e:  # noqa: BLE001 - any failure to reach the tracking store
            raise UserError(f"tracking URI {uri!r} cannot be used ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}); allowed: a reachable MLflow "
                            f"server, or sqlite:////absolute/path.db") from None

    def _experiment(self, name: str, store_root: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = artifact_location(store_root)
        try:
            return self.client.create_experiment(name, location)
        except Exception:  # created concurrently by another run
            return self.client.get_experiment_by_name(name).experiment_id

    def start_parent(self, name: str, params: dict, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"distillery.type": "pipeline", **tags})
        self._params(run.info.run_id, params)
        return run.info.run_id

    def start_stage(self, parent_id: str, name: str, kind: str, key: str, config: dict,
                    status: str) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": parent_id, "distillery.type": "stage",
                  "distillery.stage": name, "distillery.kind": kind,
                  "distillery.key": key, "distillery.status": status})
        self._params(run.info.run_id, flatten(redact(config)))
        return run.info.run_id

    def log_metrics(self, run_id: str, history: list[tuple[str, float, int | None]]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s) if s is not None else 0) for k, v, s in history]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[i:i + 900])

    def log_artifacts(self, run_id: str, paths: list[str]) -> None:
        for p in paths:
            self.client.log_artifact(run_id, p)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def end(self, run_id: str, status: str) -> None:
        """``status``: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status)

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i:i + 90])

    # -- students: lineage, logged models, registry versions ---------------------------
    def log_lineage(self, run_id: str, inputs: list[tuple[str, str, str, str]]) -> None:
        """``inputs``: (input name, upstream 'stage.output', its URI on the store, its
        content checksum), logged as the run's MLflow dataset inputs."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        datasets = [DatasetInput(Dataset(name=name, digest=digest[:32], source_type="distillery",
                                         source=json.dumps({"uri": uri, "content": digest})),
                                 tags=[InputTag("mlflow.data.context", inp)])
                    for inp, name, uri, digest in inputs]
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)

    def log_model(self, run_id: str, name: str, kind: str, key: str, uri: str) -> str:
        """An MLflow LoggedModel of the stage's run whose files stay in the store (an
        external model: nothing is copied under MLflow's artifact root)."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=run_id, model_type=kind,
            tags={MLFLOW_MODEL_IS_EXTERNAL: "true", "distillery.key": key,
                  "distillery.uri": uri})
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
        return model.model_id

    def check_registry(self, names: dict[str, str]) -> None:
        """Before anything runs: every registry name (stage -> name) is one MLflow
        accepts, and the tracking URI has a Model Registry."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import _validate_model_name
        for stage, name in names.items():
            try:
                _validate_model_name(name)
            except MlflowException as e:
                raise UserError(f"stage '{stage}': register: name {name!r} is rejected by "
                                f"MLflow ({e.message}); allowed: a non-empty name without "
                                f"'/' or ':'") from None
        try:
            self.client.search_registered_models(max_results=1)
        except Exception as e:  # noqa: BLE001 - any failure to reach the registry
            registry = self.client._registry_uri
            raise UserError(
                f"--register: the MLflow Model Registry at {redact_uri(registry)!r} is "
                f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); use a "
                f"tracking URI with a registry (the store's default sqlite database, "
                f"sqlite:////absolute/path.db, or an MLflow server with a database backend), "
                f"or point MLFLOW_REGISTRY_URI at one, or leave out register") from None

    def register(self, name: str, source: str, run_id: str, key: str,
                 model_id: str | None) -> tuple[str, bool]:
        """A Model Registry version of ``name`` whose files are ``source`` (the artifact's
        folder on the store): (version, created). An artifact key registered under
        ``name`` before gets its existing version back."""
        from mlflow.exceptions import MlflowException
        found = self.client.search_model_versions(
            f"name = '{name}' and tags.`distillery.key` = '{key}'")
        if found:
            return str(min(int(v.version) for v in found)), False
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, source, run_id=run_id,
                                                   tags={"distillery.key": key},
                                                   model_id=model_id)
        return str(version.version), True


def redact_uri(uri: str) -> str:
    """A URI without the password of its user part."""
    return re.sub(r"//([^:/@]+):[^@/]+@", r"//\1:***@", uri or "")
