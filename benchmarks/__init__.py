"""Speed benchmarks. ``python -m benchmarks [--quick]`` runs them all and writes
``benchmarks/results/<name>.json`` plus ``benchmarks/results/README.md``."""
