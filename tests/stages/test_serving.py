"""The student loaders' contract: every method a student can be made with has the paper
its model card cites; the export stage refuses what is not a committed student."""

import pytest

from pipelines.errors import UserError
from pipelines.stage import Model, registry


def test_every_loss_and_diffusion_method_cites_a_paper():
    from stages.models.diffusion_sampling import STUDENT_METHODS
    from stages.serving.diffusion import PAPERS
    from stages.train.kd_student import LOSS_PAPERS, LOSSES
    assert set(LOSSES) <= set(LOSS_PAPERS)
    assert set(STUDENT_METHODS) <= set(PAPERS)


def test_the_kinds_that_make_students():
    # the catalog's own kinds: other tests register toy stages of their own
    students = sorted(k for k, cls in registry().items()
                      if cls.mlflow_outputs and cls.__module__.startswith("stages."))
    assert students == ["consistency-distill", "dmd-distill", "kd-student",
                        "progressive-distill", "reflow", "scm-distill"]


def test_export_refuses_a_model_that_is_not_a_committed_student(tmp_path, teacher):
    from tests.stages.conftest import run_stage
    from stages.serving.export import Export
    with pytest.raises(UserError, match="input 'model'.*a student.*kd-student"):
        run_stage(Export, {}, tmp_path, "export", model=Model(path=teacher.path))
