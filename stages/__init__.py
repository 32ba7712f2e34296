"""The stage catalog, one method per file, each kind declared as an entry point of group
``distillery.stages`` in pyproject.toml (``stages.catalog`` imports them all at once).
This package itself imports nothing, so a process that unpickles one stage (a Ray task, a
Ray Train worker) imports only that stage's modules."""
