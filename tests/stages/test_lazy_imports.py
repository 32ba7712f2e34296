"""Planning a run imports each stage's module for its config: that must not import torch or
Ray (a fully cached run then starts in about a second, issue 26). The kinds checked are the
quickstart's; a kind joins LAZY once its modules name torch through ``stages.lazy``."""

import subprocess
import sys

LAZY = ["load-digits", "fit-classifier", "teacher-outputs", "kd-student",
        "evaluate-classifier", "export"]
HEAVY = ["torch", "ray", "transformers", "diffusers", "mlflow", "matplotlib"]

CHECK = """
import sys
from pipelines.stage import get_stage_class
for kind in sys.argv[1:]:
    get_stage_class(kind).Config()
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(",".join(heavy))
"""


def test_planning_the_quickstart_kinds_imports_no_heavy_library():
    proc = subprocess.run([sys.executable, "-c", CHECK.format(HEAVY=HEAVY), *LAZY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"imported at plan time: {proc.stdout.strip()}"


def test_the_lazy_module_binds_at_first_use():
    proc = subprocess.run([sys.executable, "-c", (
        "import sys\nfrom stages.lazy import lazy\nm = lazy('wave')\n"
        "before = 'wave' in sys.modules\nm.open\n"
        "print(before, 'wave' in sys.modules, repr(m))")],
        capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False True <lazy module 'wave'>", proc.stderr
