"""The MLflow tracking database of a new store: seeded from an empty database at the
installed MLflow's schema head, never replacing one that exists."""

import os
import sqlite3

from pipelines._internal.tracking import Tracker, seed_sqlite


def test_new_store_database_is_seeded_and_works(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for store in ("a", "b"):  # the first makes the template, the second copies it
        db = tmp_path / store / "mlflow" / "mlflow.db"
        tracker = Tracker("sqlite:///" + str(db), "exp", str(tmp_path / store))
        run_id = tracker.start_parent("p", {"x": 1}, {"t": "v"})
        tracker.log_metrics(run_id, [("m", 0.5, 0)])
        tracker.end(run_id, "FINISHED")
        run = tracker.client.get_run(run_id)
        assert run.data.metrics == {"m": 0.5} and run.data.params == {"x": "1"}
    templates = os.listdir(tmp_path / "cache" / "distillery")
    assert len(templates) == 1 and templates[0].endswith("-empty.db")
    # the template itself holds no runs
    rows = sqlite3.connect(tmp_path / "cache" / "distillery" / templates[0]).execute(
        "select count(*) from runs").fetchone()
    assert rows == (0,)


def test_an_existing_database_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not replaced")
    assert seed_sqlite(str(db))
    assert db.read_bytes() == b"not replaced"
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_secret_looking_config_values_are_redacted():
    from pipelines._internal.tracking import REDACTED, redact
    config = {"lr": 0.1, "api_key": "sk-123", "hub": {"HF_TOKEN": "hf_x", "repo": "a/b"},
              "aws_secret_access_key": "abc", "password": "", "layers": [{"token_ids": 3}],
              "tokenizer": "gpt2"}
    assert redact(config) == {"lr": 0.1, "api_key": REDACTED,
                              "hub": {"HF_TOKEN": REDACTED, "repo": "a/b"},
                              "aws_secret_access_key": REDACTED, "password": "",
                              "layers": [{"token_ids": 3}], "tokenizer": "gpt2"}
    assert config["api_key"] == "sk-123"  # the config itself is left as it is
    assert redact({"apiKey": "k", "max_tokens": 5, "db": {"Password": "p"}}) == {
        "apiKey": REDACTED, "max_tokens": 5, "db": {"Password": REDACTED}}
