"""Issue 17, during training: `eval.every_n_steps` writes the DreamBooth paper's DINO, CLIP-I and
CLIP-T of the current weights into metrics.jsonl, the same numbers `minidream.evaluate` gives for
the exported model (SD and SDXL); under torchrun the ranks split the prompts."""

import subprocess
import sys

import pytest
from eval_references import PHOTOS, TINY_CLIP, TINY_DINO, reference_clip, reference_vit
from train_runs import ENVIRONMENT, SETUPS, TRAIN, metrics, output, train_args

import train
from minidream import load_pipeline
from minidream.dreambooth_prompts import subject_prompts
from minidream.evaluate import (
    Sampling,
    embed_images,
    evaluate,
    load_eval_models,
    read_prompt_templates,
    subject_images,
)

PROMPTS = ["a sks dog in the jungle", "a sks dog in the snow", "a sks dog on the beach"]


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    reference_clip(TINY_CLIP, seed=1).save_pretrained(root / "clip")
    reference_vit(TINY_DINO, seed=2).save_pretrained(root / "dino")
    return root


@pytest.mark.parametrize("nproc, architecture", [(1, "tiny"), (2, "tiny"), (1, "tiny-sdxl")])
def test_scores_in_metrics_equal_evaluating_the_exported_model(nproc, architecture, eval_models, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    args = [str(TRAIN), f"run.output_dir={run_dir}", f"model.architecture={architecture}", f"data.instance_dir={PHOTOS / 'dog'}", "data.class_dir=null",
            "train.max_steps=4", "train.batch_size=1", "checkpoint.every_n_steps=4", "validation.prompts=[]",
            "eval.every_n_steps=2", f"eval.clip={eval_models / 'clip'}", f"eval.dino={eval_models / 'dino'}",
            f"eval.prompts=[{', '.join(PROMPTS)}]", "eval.images_per_prompt=2", "eval.steps=2"]
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run([*launch, *args], capture_output=True, text=True, env=ENVIRONMENT, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, output(result)
    records = metrics(run_dir)
    assert [r["step"] for r in records if "dino" in r] == [2, 4]  # eval steps only, one record per step as ever
    final = records[-1]

    models = load_eval_models(eval_models / "clip", eval_models / "dino")
    real = embed_images(models, subject_images(PHOTOS / "dog"))
    scores, _ = evaluate(load_pipeline(run_dir / "model.safetensors"), models, real, PROMPTS, images_per_prompt=2,
                         sampling=Sampling(steps=2, guidance=7.5, height=64, width=64))  # eval.guidance's default
    for name in ("dino", "clip_i", "clip_t"):
        assert -1 <= final[name] <= 1
        # One thread here as in the run (one_thread): with two, sums ran in another order and a score
        # moved by 1.03e-5. 1e-5 still allows a pixel a level apart (~1e-6 of a score).
        assert final[name] == pytest.approx(getattr(scores, name), abs=1e-5), name


def test_several_subjects_are_each_evaluated_on_their_own_photos_and_prompts(eval_models, training_data, tmp_path, one_thread):
    """data.subjects: each subject's scores (`dino/<name>` ...) are those of the exported model on its
    photos, with its identifier and the paper's prompts for its class noun; `dino` etc. cover all."""
    run_dir = tmp_path / "run"
    overrides = (*SETUPS["subjects"].overrides, "train.max_steps=2", "checkpoint.every_n_steps=2", "eval.every_n_steps=2",
                 f"eval.clip={eval_models / 'clip'}", f"eval.dino={eval_models / 'dino'}", "eval.num_prompts=1",
                 "eval.images_per_prompt=1", "eval.steps=2")
    assert train.main(train_args(run_dir, training_data, overrides)) == 0
    final = metrics(run_dir)[-1]

    models = load_eval_models(eval_models / "clip", eval_models / "dino")
    pipe = load_pipeline(run_dir / "model.safetensors")
    for name, identifier, noun in (("dog", "sks", "dog"), ("cat", "zwx", "cat")):
        prompts = subject_prompts(read_prompt_templates(None, noun)[1], identifier, noun)[:1]
        real = embed_images(models, subject_images(training_data / name))
        scores, _ = evaluate(pipe, models, real, prompts, identifier, images_per_prompt=1, sampling=Sampling(steps=2, height=64, width=64))
        for score in ("dino", "clip_i", "clip_t"):
            assert final[f"{score}/{name}"] == pytest.approx(getattr(scores, score), abs=1e-5), (name, score)
    for score in ("dino", "clip_i", "clip_t"):  # one prompt and image each: the overall mean is the subjects' mean
        assert final[score] == pytest.approx((final[f"{score}/dog"] + final[f"{score}/cat"]) / 2, abs=1e-6)
    assert final["dino/dog"] != final["dino/cat"]  # each on its own photos


def test_eval_prompts_with_several_subjects_are_refused_before_any_model_loads(eval_models, training_data, tmp_path, capsys):
    overrides = (*SETUPS["subjects"].overrides, "eval.every_n_steps=2", f"eval.clip={eval_models / 'clip'}",
                 f"eval.dino={eval_models / 'dino'}", "eval.prompts=[a sks dog]")
    assert train.main(train_args(tmp_path / "run", training_data, overrides)) == 2
    assert "eval.prompts with data.subjects" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()
