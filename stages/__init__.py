"""The stage catalog, one method per file; ``stages.catalog`` imports them all and so
registers every kind. This package itself imports nothing, so a process that unpickles one
stage (a Ray task, a Ray Train worker) imports only that stage's modules."""
