"""``evaluate-generation`` on a latent text-to-image teacher: a tiny random SD 1.5 pipeline
(``t2i_tiny``) -> load-prompts / encode-prompts -> diffusion-trajectories ->
diffusion-pairs -> consistency-distill (embedded guidance, 1 epoch), a small classifier
fitted on 8x8 digits with a ``prompt`` column ("a digit <label>"), then the evaluation:
every metric name is there and finite, the reference teacher's distance to itself is 0,
and the two clear errors (too many student steps, no embeddings)."""

import math
import os

import numpy as np
import pytest

from pipelines.errors import UserError
from stages.data.load_prompts import LoadPrompts
from stages.distill.diffusion_pairs import DiffusionPairs
from stages.evaluate.evaluate_generation import EvaluateGeneration
from stages.evaluate.generation_metrics import paired_rows
from stages.evaluate.generation_t2i import prompt_labels, to_classifier
from stages.teacher.diffusion_trajectories import DiffusionTrajectories
from stages.teacher.encode_prompts import EncodePrompts
from stages.teacher.fit_classifier import FitClassifier
from stages.teacher.pretrained_diffusion import PretrainedDiffusion
from stages.train.consistency_distill import ConsistencyDistill
from tests.stages.conftest import run_stage
from tests.stages.t2i_tiny import build

PROMPTS = [f"a digit {i}" for i in range(10)] + ["a red car", "a cat on a tree"]
EVAL = {"teacher_steps": [2], "student_steps": [1, 2], "num_samples": 12, "batch_size": 8,
        "kid_subsets": 2, "kid_subset_size": 6, "latency_batch_size": 2,
        "latency_repeats": 2, "guidance_scales": [1.0, 4.0]}


@pytest.fixture(scope="module")
def chain(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_eval")
    src = build("sd15", str(root / "src"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    prompts = run_stage(LoadPrompts, {"path": str(root / "prompts.txt"), "test_fraction": 0.3},
                        root, "prompts")[0]["prompts"]
    teacher = run_stage(PretrainedDiffusion, {"path": src}, root, "teacher")[0]["model"]
    emb = run_stage(EncodePrompts, {"batch_size": 8}, root, "emb", pipeline=teacher,
                    prompts=prompts)[0]["embeddings"]
    traj = run_stage(DiffusionTrajectories,
                     {"steps": 4, "keep_states": 3, "guidance_scale": [1.5, 4.0],
                      "shard_size": 8}, root, "traj", teacher=teacher,
                     embeddings=emb)[0]["trajectories"]
    pairs = run_stage(DiffusionPairs, {}, root, "pairs", trajectories=traj)[0]
    cd = {"epochs": 1, "batch_size": 4, "num_workers": 0, "guidance": "embedded"}
    student = run_stage(ConsistencyDistill, cd, root, "cd", teacher=teacher,
                        pairs=pairs["consistency"], embeddings=emb)[0]["model"]
    data = digits_with_prompts(root)
    classifier = run_stage(FitClassifier, {"epochs": 2, "width": 8}, root, "clf",
                           data=data)[0]["model"]
    return {"root": root, "teacher": teacher, "emb": emb, "student": student, "data": data,
            "classifier": classifier, "prompts": prompts}


def digits_with_prompts(root):
    """400 of scikit-learn's 8x8 digits with ``prompt`` = "a digit <label>"."""
    from sklearn.datasets import load_digits

    from pipelines.context import StageContext
    digits = load_digits()
    x = (digits.images[:400] / 16.0).astype(np.float32)[:, None]
    y = digits.target[:400].astype(np.int64)
    split = np.where(np.arange(400) % 4 == 0, "test", "train")
    ctx = StageContext.for_testing(root, name="data", kind="test")
    return ctx.write_dataset("data", {"id": np.arange(400), "x": x, "label": y,
                                      "split": split, "prompt": [f"a digit {v}" for v in y]},
                             info={"num_classes": 10, "input_shape": [1, 8, 8]})


def evaluate(chain, tmp_path, config=None, **over):
    inputs = {"teacher": chain["teacher"], "classifier": chain["classifier"],
              "data": chain["data"], "students": {"cd": chain["student"]},
              "embeddings": chain["emb"], **over}
    return run_stage(EvaluateGeneration, {**EVAL, **(config or {})}, tmp_path, "eval",
                     **inputs)[0]["report"]


def test_t2i_metrics(chain, tmp_path):
    test_prompts = chain["prompts"].to_numpy(["prompt", "split"])
    assert (test_prompts["split"] == "test").sum() >= 2  # the held-out prompts scored
    report = evaluate(chain, tmp_path)
    m = report.metrics()
    assert all(math.isfinite(v) for v in m.values())
    keys = ["teacher/2", "cd/1", "cd/2"]
    for metric in ("fid", "kid", "precision", "recall", "teacher_distance",
                   "digit_accuracy", "ms_per_image", "denoiser_ms_per_image"):
        for key in keys:
            assert f"{metric}/{key}" in m, f"{metric}/{key}"
    for key in ("fid/real/floor", "kid/real/floor", "speedup/cd/1", "speedup/cd/2",
                "denoiser_speedup/cd/1", "denoiser_speedup/cd/2",
                "digit_accuracy_w/teacher/1", "digit_accuracy_w/teacher/4",
                "digit_accuracy_w/cd/1", "digit_accuracy_w/cd/4"):
        assert key in m, key
    assert m["teacher_distance/teacher/2"] == 0.0  # the reference against itself
    assert m["teacher_distance/cd/1"] > 0 and m["teacher_distance/cd/2"] > 0
    assert all(0 <= m[k] <= 1 for k in m if k.startswith("digit_accuracy"))
    assert m["speedup/cd/1"] > 0 and m["ms_per_image/teacher/2"] > 0
    assert report.info["num_samples"] == 12 and report.info["labelled_rows"] > 0
    held = set(test_prompts["prompt"][test_prompts["split"] == "test"])
    data_prompts = chain["data"].to_numpy(["prompt"])["prompt"]
    assert report.info["reference"] == "paired"  # auto: the data has a prompt column
    assert report.info["real_images"] == sum(str(p) in held for p in data_prompts)
    assert {"samples.png", "accuracy_vs_w.png", "fid_vs_steps.png"} <= set(
        os.listdir(report.path))


def test_t2i_too_many_student_steps(chain, tmp_path):
    with pytest.raises(UserError, match=r"\(evaluate-generation\) input 'students' "
                                        r"\(stage 'cd'\).*steps for the consistency "
                                        r"student 4.*at most 2"):
        evaluate(chain, tmp_path, {"student_steps": [1, 4]})


def test_t2i_needs_embeddings(chain, tmp_path):
    with pytest.raises(UserError, match=r"\(evaluate-generation\).*input 'embeddings'.*"
                                        r"encode-prompts output"):
        evaluate(chain, tmp_path, embeddings=None)


def test_t2i_helpers(chain):
    import torch
    rgb = torch.rand(2, 3, 32, 48)
    out = to_classifier(rgb, (1, 8, 8))  # grey, centre-cropped to square, resized
    assert out.shape == (2, 1, 8, 8) and 0 <= out.min() and out.max() <= 1
    white = to_classifier(torch.ones(1, 3, 16, 16), (1, 8, 8))
    assert torch.allclose(white, torch.ones_like(white), atol=1e-5)
    labels = prompt_labels(chain["data"], ["a digit 3", "a cat", "a digit 7"])
    assert labels.tolist() == [3, -1, 7]


def test_t2i_classifier_view_crop():
    """A teacher trained on 28-pixel images padded to 32 is seen through the centre crop:
    the padded image maps back to the original exactly (resizing would shrink the digit)."""
    import torch
    digit = torch.rand(3, 1, 28, 28)
    padded = torch.nn.functional.pad(digit, (2, 2, 2, 2)).expand(-1, 3, -1, -1)
    assert torch.allclose(to_classifier(padded, (1, 28, 28), "crop"), digit, atol=1e-6)
    assert not torch.allclose(to_classifier(padded, (1, 28, 28), "resize"), digit, atol=1e-2)
    small = to_classifier(torch.rand(2, 3, 16, 16), (1, 28, 28), "crop")  # smaller: resized
    assert small.shape == (2, 1, 28, 28)


def test_paired_rows_share_the_real_images_prompts():
    """Generated row r takes the prompt of real image B[r]; A and B are disjoint halves of
    the rows whose prompt is evaluated, so both sets have one prompt distribution (a
    generator that returned real images would score the floor, not a mismatch)."""
    rng = np.random.default_rng(1)
    data_prompts = rng.choice(["p0", "p1", "p2", "other"], size=300, p=[.5, .2, .1, .2])
    evaluated = ["p2", "p0", "p1"]
    a, b, prompt_of = paired_rows(data_prompts, evaluated, None, seed=3)
    assert set(a).isdisjoint(b) and abs(len(a) - len(b)) <= 1
    assert len(a) + len(b) == (data_prompts != "other").sum()
    assert [evaluated[i] for i in prompt_of] == data_prompts[b].tolist()
    again = paired_rows(data_prompts, evaluated, 10, seed=3)
    assert again[0].tolist() == a.tolist() and again[1].tolist() == b[:10].tolist()
    assert np.array_equal(again[2], prompt_of[:10])


def test_t2i_reference_test_split_and_bad_reference(chain, tmp_path):
    report = evaluate(chain, tmp_path, {"reference": "test-split", "teacher_steps": [1],
                                        "student_steps": [1], "guidance_scales": [4.0]})
    test = chain["data"].to_numpy(["split"])["split"] == "test"
    assert report.info["reference"] == "test-split"
    assert report.info["real_images"] == test.sum()
    from pipelines.context import StageContext
    ctx = StageContext.for_testing(tmp_path, name="plain", kind="test")
    plain = ctx.write_dataset("data", {"id": np.arange(40), "x": np.zeros((40, 1, 8, 8),
                                                                          np.float32),
                                       "split": np.array(["test", "train"] * 20)})
    with pytest.raises(UserError, match=r"input 'data' \(config reference: paired\).*"
                                        r"columns.*'prompt' column"):
        evaluate(chain, tmp_path, {"reference": "paired"}, data=plain)
    with pytest.raises(UserError, match=r"input 'data' \(config reference: auto\).*"
                                        r"images whose prompt is a held-out prompt.*80.*at "
                                        r"least 82 \(or reference: test-split\)"):
        evaluate(chain, tmp_path, {"pr_k": 40})  # 2 x (k + 1) images needed, 80 held out
