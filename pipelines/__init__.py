"""distillery's orchestration core.

Public API::

    from pipelines import Pipeline, Stage, StageConfig, Many, run, plan, sweep
"""

from ._internal.env import apply_defaults as _apply_defaults

_apply_defaults()

from ._internal.runner import RunResult, StageResult, plan, run  # noqa: E402
from .artifacts import Artifact, Dataset, Model, Report  # noqa: E402
from .context import StageContext  # noqa: E402
from .errors import StageFailed, UserError  # noqa: E402
from .pipeline import Pipeline  # noqa: E402
from .stage import Many, Resources, Stage, StageConfig, registry  # noqa: E402
from .sweep import SweepResult, sweep  # noqa: E402

__all__ = ["Pipeline", "Stage", "StageConfig", "Many", "Resources", "StageContext", "Artifact",
           "Dataset", "Model", "Report", "run", "plan", "RunResult", "StageResult",
           "UserError", "StageFailed", "registry", "sweep", "SweepResult"]
