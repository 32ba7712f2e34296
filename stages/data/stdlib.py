"""The Python standard library's source files on this machine, the offline text of the
data stages that read docstrings (``load-text-corpus``, ``load-instructions``): found
under ``sysconfig``'s stdlib folder, in sorted order, test suites and IDLE skipped;
parsed with ``ast`` by the stages, never imported."""

from __future__ import annotations

import os

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return sorted(out)
