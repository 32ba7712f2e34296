"""The stage catalog: one method per file. Importing this module imports and registers
every built-in kind at once (a convenience for scripts and tests; ``pipelines`` never
imports it: it finds each kind through its entry point, importing only that kind's file).

A new method is a new file, its line in pyproject.toml's
``[project.entry-points."distillery.stages"]`` (tests/pipelines/test_plugins.py checks
that every stage class has one) and one line here.
"""

from stages.data import digits  # noqa: F401
from stages.data import mnist1d  # noqa: F401
from stages.teacher import fit_classifier  # noqa: F401
from stages.teacher import teacher_outputs  # noqa: F401
from stages.train import kd_student  # noqa: F401
from stages.evaluate import evaluate_classifier  # noqa: F401
from stages.distill import reinforce_data  # noqa: F401
from stages.data import text_corpus  # noqa: F401
from stages.teacher import pretrained_model  # noqa: F401
from stages.teacher import fit_causal_lm  # noqa: F401
from stages.data import mnist  # noqa: F401
from stages.data import load_prompts  # noqa: F401
from stages.teacher import expert_trajectories  # noqa: F401
from stages.distill import random_subset, dm, mtt, herding, datadam, sre2l  # noqa: F401
from stages.evaluate import evaluate_synthetic  # noqa: F401
from stages.teacher import fit_diffusion_teacher  # noqa: F401
from stages.teacher import diffusion_trajectories  # noqa: F401
from stages.distill import diffusion_pairs  # noqa: F401
from stages.train import consistency_distill  # noqa: F401
from stages.train import progressive_distill  # noqa: F401
from stages.train import reflow  # noqa: F401
from stages.evaluate import evaluate_generation  # noqa: F401
from stages.evaluate import evaluate_embeddings  # noqa: F401
from stages.evaluate import evaluate_lm  # noqa: F401
from stages.train import scm_distill  # noqa: F401
from stages.train import dmd_distill  # noqa: F401
