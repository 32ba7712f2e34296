"""Environment defaults for an embedded Ray and MLflow, applied before they are imported
(a value the user set always wins)."""

import os

DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",          # no ~/.ray/auth_token for an embedded Ray
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",                # models load from local folders only
    # Ray Train's controller polls its workers this often (Ray's default 2 s): every
    # ``ray.train.report`` and the end of a run wait for a poll, seconds per run at 2 s
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def apply_defaults() -> None:
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
