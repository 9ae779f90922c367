"""python -m minidream.evaluate: the metric math, the paper's prompts, a whole run at tiny scale
recomputed with transformers, --compare, and the one-line errors."""

import hashlib
import json
import re

import pytest
import torch
import transformers
from eval_references import PHOTOS, TINY_CLIP, TINY_DINO, reference_clip, reference_vit
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from test_lora_files import adapt

from minidream import evaluate
from minidream.config import TINY
from minidream.dreambooth_prompts import (
    LIVE_CLASSES,
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    subject_prompts,
)
from minidream.evaluate import (
    PromptScores,
    Scores,
    clip_t_prompt,
    cosine_matrix,
    mean_distinct_pairwise_cosine,
    mean_pairwise_cosine,
    mean_text_image_cosine,
)
from minidream.io.lora_files import save_lora
from minidream.io.weights import save_pipeline
from minidream.models.pipeline import random_pipeline
from minidream.models.tokenizer import CLIPTokenizer

PROMPTS_FILE = PHOTOS / "prompts_and_classes.txt"


# --- The metric math -----------------------------------------------------------------------------


def embeddings(seed: int, n: int, d: int = 8) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def double_loop(a: torch.Tensor, b: torch.Tensor) -> float:
    total = 0.0
    for x in a.tolist():
        for y in b.tolist():
            dot = sum(p * q for p, q in zip(x, y))
            total += dot / (sum(p * p for p in x) ** 0.5 * sum(q * q for q in y) ** 0.5)
    return total / (len(a) * len(b))


@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 6))
def test_pairwise_mean_equals_a_double_loop_and_is_symmetric(seed, n, m):
    a, b = embeddings(seed, n), embeddings(seed + 1, m)
    assert mean_pairwise_cosine(a, b) == pytest.approx(double_loop(a, b), abs=1e-6)
    assert mean_pairwise_cosine(a, b) == pytest.approx(mean_pairwise_cosine(b, a), abs=1e-6)
    # Cosines ignore length: rescaling any embedding changes nothing.
    scales = torch.rand(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    assert mean_pairwise_cosine(a * scales, b) == pytest.approx(mean_pairwise_cosine(a, b), abs=1e-6)


def test_identical_images_score_one():
    one = embeddings(0, 1)
    copies = one.expand(4, -1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=torch.float64)
    assert mean_pairwise_cosine(copies, one.expand(3, -1)) == pytest.approx(1.0, abs=1e-6)
    assert mean_distinct_pairwise_cosine(copies) == pytest.approx(1.0, abs=1e-6)
    assert mean_text_image_cosine(one[0], copies) == pytest.approx(1.0, abs=1e-6)
    assert mean_pairwise_cosine(one, -one) == pytest.approx(-1.0, abs=1e-6)


def test_distinct_pairs_leave_out_each_image_with_itself():
    a = embeddings(3, 5)
    expected = sum(double_loop(a[i : i + 1], a[j : j + 1]) for i in range(5) for j in range(5) if i != j) / 20
    assert mean_distinct_pairwise_cosine(a) == pytest.approx(expected, abs=1e-6)
    assert mean_distinct_pairwise_cosine(a[:1]) is None


def test_clip_t_equals_a_loop_and_overall_scores_are_the_means_over_all_pairs():
    texts, images, real = embeddings(4, 3), embeddings(5, 3 * 4).reshape(3, 4, -1), embeddings(6, 5)
    per_prompt = [
        PromptScores(f"p{p}", f"p{p}", mean_pairwise_cosine(images[p], real), 0.0, mean_text_image_cosine(texts[p], images[p]))
        for p in range(3)
    ]
    for p in range(3):
        assert per_prompt[p].clip_t == pytest.approx(double_loop(texts[p : p + 1], images[p]), abs=1e-6)
    scores = Scores.of(per_prompt)
    assert scores.dino == pytest.approx(mean_pairwise_cosine(images.reshape(12, -1), real), abs=1e-6)
    assert scores.clip_t == pytest.approx(sum(double_loop(texts[p : p + 1], images[p]) for p in range(3)) / 3, abs=1e-6)
    assert cosine_matrix(texts, real).shape == (3, 5)


def test_clip_t_drops_the_identifier_word_only():
    assert clip_t_prompt("a sks dog wearing a santa hat", "sks") == "a dog wearing a santa hat"
    assert clip_t_prompt("a red sks dog", "sks") == "a red dog"
    assert clip_t_prompt("a sksy sks dog", "sks") == "a sksy dog"
    assert clip_t_prompt("a sks dog", "sks", keep_identifier=True) == "a sks dog"


# --- The paper's prompts -----------------------------------------------------------------------


def dataset_prompts(section: str) -> list[str]:
    """The prompt templates of one section of the dataset's prompts_and_classes.txt, as {0}/{1}."""
    text = PROMPTS_FILE.read_text()
    start = text.index(section)
    end = text.index("prompt_list", text.index("prompt_list", start) + 1) if section == "Object Prompts" else len(text)
    return re.findall(r"^'(.*)'\.format\(unique_token, class_token\)", text[start:end], re.MULTILINE)


def test_prompt_lists_are_the_datasets():
    assert list(OBJECT_PROMPTS) == dataset_prompts("Object Prompts")
    assert list(LIVE_PROMPTS) == dataset_prompts("Live Subject Prompts")
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25


def test_live_classes_are_the_datasets_live_subjects():
    table = PROMPTS_FILE.read_text().split("subject_name,class\n")[1].split("\n\n")[0]
    classes = dict(line.split(",") for line in table.strip().splitlines())
    live = {classes[name] for name in classes if name.rstrip("0123456789") in ("dog", "cat")}
    assert live == set(LIVE_CLASSES)
    assert subject_prompts(LIVE_PROMPTS[:2], "sks", "stuffed animal") == ["a sks stuffed animal in the jungle", "a sks stuffed animal in the snow"]


# --- A whole run at tiny scale ------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny minidream model and tiny random evaluation models in the transformers layout."""
    root = tmp_path_factory.mktemp("evaluate")
    save_pipeline(random_pipeline(TINY, seed=3), root / "model.safetensors")
    reference_clip(TINY_CLIP, seed=1).save_pretrained(root / "clip")
    reference_vit(TINY_DINO, seed=2).save_pretrained(root / "dino")
    return root


def base_args(files, out) -> list[str]:
    return [
        "--weights", str(files / "model.safetensors"), "--subject-dir", str(PHOTOS / "dog"), "--class-noun", "dog",
        "--clip", str(files / "clip"), "--dino", str(files / "dino"), "--out", str(out),
        "--steps", "2", "--height", "64", "--width", "64", "--seed", "5",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "eval"
    assert evaluate.main([*base_args(files, out), "--images-per-prompt", "2", "--batch-size", "2"]) == 0
    return out


def reference_scores(files, out, result):
    """eval.json's numbers recomputed from the saved PNGs with transformers' processors and models."""
    clip = transformers.CLIPModel.from_pretrained(files / "clip").eval()
    dino = transformers.ViTModel.from_pretrained(files / "dino").eval()
    clip_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    dino_processor = transformers.ViTImageProcessorPil(
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=2, size={"height": 32, "width": 32}
    )

    def embed(images):
        with torch.no_grad():
            clip_pixels = clip_processor(images=images, return_tensors="pt")["pixel_values"]
            dino_pixels = dino_processor(images=images, return_tensors="pt")["pixel_values"]
            return dino(pixel_values=dino_pixels).last_hidden_state[:, 0], clip.get_image_features(pixel_values=clip_pixels).pooler_output

    real_dino, real_clip = embed([Image.open(path).convert("RGB") for path in sorted((PHOTOS / "dog").glob("*.jpg"))])
    rows = []
    for entry in result["per_prompt"]:
        images = [Image.open(out / name).convert("RGB") for name in entry["images"]]
        gen_dino, gen_clip = embed(images)
        with torch.no_grad():
            text = clip.get_text_features(input_ids=CLIPTokenizer()([entry["clip_t_prompt"]])).pooler_output
        rows.append((double_loop(gen_dino, real_dino), double_loop(gen_clip, real_clip), double_loop(text, gen_clip)))
    return rows


def test_run_writes_images_report_and_contact_sheet(run):
    result = json.loads((run / "eval.json").read_text())
    assert len(result["per_prompt"]) == 25 and result["settings"]["prompts"] == "live"  # dog: the live list
    first = result["per_prompt"][0]
    assert first["prompt"] == "a sks dog in the jungle" and first["clip_t_prompt"] == "a dog in the jungle"
    assert first["images"] == ["images/0-0.png", "images/0-1.png"]
    assert sorted(p.name for p in (run / "images").iterdir()) == sorted(f"{p}-{k}.png" for p in range(25) for k in range(2))
    with Image.open(run / "images" / "3-1.png") as image:
        assert image.size == (64, 64)
        assert image.text["parameters"].startswith(f"{result['per_prompt'][3]['prompt']}\nNegative prompt: \nSteps: 2")
        assert "Seed: 6," in image.text["parameters"]  # image 1 of every prompt: seed 5 + 1
    with Image.open(run / "contact_sheet.png") as sheet:
        assert sheet.size == (5 * 128, 26 * 128)  # the 5 dog photos, then 25 prompts x 2
    assert set(result["sha256"]) == {"weights", "clip", "dino"}
    assert all(re.fullmatch("[0-9a-f]{64}", digest) for files in result["sha256"].values() for digest in files.values())
    markdown = (run / "eval.md").read_text()
    assert "| DreamBooth, Stable Diffusion (paper) | 0.668 | 0.803 | 0.305 |" in markdown
    assert f"| {result['dino']:.3f} | {result['clip_i']:.3f} | {result['clip_t']:.3f} |" in markdown
    assert not list(run.glob(".*.tmp")) and not list((run / "images").glob(".*.tmp"))


def test_run_scores_equal_transformers_recomputed_from_the_saved_images(files, run):
    result = json.loads((run / "eval.json").read_text())
    rows = reference_scores(files, run, result)
    for entry, (dino, clip_i, clip_t) in zip(result["per_prompt"], rows):
        assert entry["dino"] == pytest.approx(dino, abs=1e-5)
        assert entry["clip_i"] == pytest.approx(clip_i, abs=1e-5)
        assert entry["clip_t"] == pytest.approx(clip_t, abs=1e-5)
    for index, name in enumerate(("dino", "clip_i", "clip_t")):
        assert result[name] == pytest.approx(sum(row[index] for row in rows) / len(rows), abs=1e-5)
    # The images differ from prompt to prompt, so the scores do too: nothing constant passes this.
    assert len({round(entry["clip_t"], 6) for entry in result["per_prompt"]}) > 1


def test_same_seed_same_images_and_scores(files, run, tmp_path):
    """A second run of two prompts from a file reproduces the first run's images and their scores
    (same batch size: a batch of another size may round a pixel differently)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} in the jungle\n\na {0} {1} in the snow\n")
    out = tmp_path / "again"
    assert evaluate.main([*base_args(files, out), "--images-per-prompt", "2", "--batch-size", "2", "--prompts", str(prompts)]) == 0
    again, first = json.loads((out / "eval.json").read_text()), json.loads((run / "eval.json").read_text())
    for name in ("0-0.png", "1-1.png"):
        assert Image.open(out / "images" / name).tobytes() == Image.open(run / "images" / name).tobytes()
    assert again["per_prompt"][1]["clip_t"] == pytest.approx(first["per_prompt"][1]["clip_t"], abs=1e-6)


def test_compare_prints_the_runs_beside_the_paper(run, capsys):
    assert evaluate.main(["--compare", str(run / "eval.json"), str(run / "eval.json")]) == 0
    table = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert table.count(f"| {run / 'eval.json'} | {result['dino']:.3f} | {result['clip_i']:.3f} | {result['clip_t']:.3f} |") == 2
    assert "| Real images (paper) | 0.774 | 0.885 | – |" in table


# --- Bad input: one line naming it, exit code 2 ----------------------------------------------------


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_unknown_prompt_list(files, tmp_path, capsys):
    assert evaluate.main([*base_args(files, tmp_path / "out"), "--prompts", "animals"]) == 2
    assert error_line(capsys) == "error: --prompts animals: not 'object', 'live' or an existing prompt file"


def test_empty_subject_folder(files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = base_args(files, tmp_path / "out")
    args[args.index("--subject-dir") + 1] = str(tmp_path / "empty")
    assert evaluate.main(args) == 2
    assert error_line(capsys) == f"error: subject folder {tmp_path / 'empty'} holds no images; put the subject's photos there"


def test_missing_and_mismatched_evaluation_models(files, tmp_path, capsys):
    args = base_args(files, tmp_path / "out")
    args[args.index("--clip") + 1] = str(tmp_path / "missing")
    assert evaluate.main(args) == 2
    assert error_line(capsys) == f"error: --clip: {tmp_path / 'missing'}: no such file or folder; expected a CLIP model (transformers CLIPModel) folder with config.json"
    args = base_args(files, tmp_path / "out")
    args[args.index("--dino") + 1] = str(files / "clip")
    assert evaluate.main(args) == 2
    assert "error: --dino: " in error_line(capsys)
    assert not (tmp_path / "out").exists()  # nothing drawn or written before the inputs are checked


def test_compare_of_a_file_that_is_not_an_eval_json(files, capsys):
    assert evaluate.main(["--compare", str(files / "clip" / "config.json")]) == 2
    assert error_line(capsys) == f"error: {files / 'clip' / 'config.json'}: not an eval.json written by python -m minidream.evaluate"


def test_evaluate_function_for_train_py_in_bfloat16(files):
    """The function train.py calls: a Pipeline in memory, evaluation models in the AMP dtype.
    bf16 evaluation models give the fp32 scores to within 0.02 (bf16 has 8 bits of mantissa)."""
    pipe = random_pipeline(TINY, seed=3)
    prompts = subject_prompts(LIVE_PROMPTS[:2], "sks", "dog")
    sampling = evaluate.Sampling(steps=2, height=64, width=64, batch_size=4)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        models = evaluate.load_eval_models(files / "clip", files / "dino", dtype=dtype)
        assert models.clip.visual_projection.weight.dtype == dtype
        real = evaluate.embed_images(models, evaluate.subject_images(PHOTOS / "dog"))
        results[dtype], images = evaluate.evaluate(pipe, models, real, prompts, "sks", images_per_prompt=2, seed=0, sampling=sampling)
        assert [len(group) for group in images] == [2, 2] and images[0][0].size == (64, 64)
    fp32, bf16 = results[torch.float32], results[torch.bfloat16]
    assert [p.clip_t_prompt for p in fp32.per_prompt] == ["a dog in the jungle", "a dog in the snow"]
    for name in ("dino", "clip_i", "clip_t"):
        assert getattr(bf16, name) == pytest.approx(getattr(fp32, name), abs=0.02)


def test_a_lora_and_the_shared_sampling_flags_are_applied_and_recorded(files, tmp_path):
    """--lora (at strength 0 the plain model's images, at 1 other ones), --clip-skip and
    --guidance-rescale reach the images and are recorded in eval.json and the PNG text."""
    donor = adapt(random_pipeline(TINY))
    lora_path = tmp_path / "sks.safetensors"
    save_lora(lora_path, donor.unet, donor.text_encoder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} in the snow\n")
    common = ["--images-per-prompt", "1", "--prompts", str(prompts), "--clip-skip", "2", "--guidance-rescale", "0.5"]
    results = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{lora_path}:0"]), ("one", ["--lora", str(lora_path)])):
        assert evaluate.main([*base_args(files, tmp_path / name), *common, *extra]) == 0
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    image = {name: Image.open(tmp_path / name / "images" / "0-0.png") for name in results}
    assert image["zero"].tobytes() == image["plain"].tobytes()
    assert image["one"].tobytes() != image["plain"].tobytes()
    assert results["one"]["dino"] != results["plain"]["dino"]
    settings = results["one"]["settings"]
    assert settings["loras"] == [{"path": str(lora_path), "scale": 1.0}] and results["plain"]["settings"]["loras"] == []
    assert (settings["clip_skip"], settings["guidance_rescale"]) == (2, 0.5)
    assert results["one"]["sha256"]["loras"] == {str(lora_path): hashlib.sha256(lora_path.read_bytes()).hexdigest()}
    text = image["one"].text["parameters"]
    assert text.startswith("a sks dog in the snow <lora:sks:1>\n") and "CFG Rescale phi: 0.5, Clip skip: 2" in text
