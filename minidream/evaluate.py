"""The DreamBooth paper's scores for a fine-tuned model: DINO, CLIP-I and CLIP-T (Ruiz et al. 2023, §4.1).

    python -m minidream.evaluate --weights runs/my-dog --subject-dir photos/my-dog --class-noun dog \\
        --clip weights/eval/clip-vit-base-patch32 --dino weights/eval/dino-vits16 --out runs/my-dog/eval
    python -m minidream.evaluate --weights weights/v1-5-pruned-emaonly.safetensors --lora runs/my-dog/lora.safetensors \\
        --subject-dir photos/my-dog --class-noun dog --clip ... --dino ... --out runs/my-dog/eval-lora
    python -m minidream.evaluate --compare runs/a/eval/eval.json runs/b/eval/eval.json

For every prompt of the paper's list (25 object or 25 live-subject prompts) it draws
`--images-per-prompt` images (image k of every prompt uses seed S + k, as sample.py), then:
- DINO: the mean cosine similarity over all (generated, real) pairs of DINO ViT-S/16 CLS
  embeddings (subject fidelity);
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: the mean cosine between each prompt's CLIP text embedding and its images (prompt
  fidelity). The paper does not say whether that text holds the identifier. minidream removes
  it by default ("a sks dog in the snow" is scored as "a dog in the snow"): the evaluation
  CLIP never learned the rare token, so it only adds noise to the text embedding, and a prompt
  fidelity score should not reward an image for looking like "sks". `--clip-t-identifier keep`
  scores the prompt as sampled; eval.json records which, and each prompt's scored text.
Each score is the mean of its per-prompt scores (every prompt has the same number of images,
so it is also the mean over all pairs), so prompts split over ranks combine by averaging.

`evaluate(pipe, models, real, prompts, ...)` is the whole measurement, for train.py too; the
command's files (eval.json, eval.md, the contact sheet) are made in eval_report.py.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

import minidream
from minidream.config import CLIP_PREPROCESS, DINO_PREPROCESS, ImagePreprocessConfig
from minidream.dreambooth_prompts import LIVE_CLASSES, PROMPT_LISTS, subject_prompts
from minidream.eval_report import (
    PAPER_TABLE,
    SCORES,
    compare_table,
    contact_sheet,
    file_hashes,
    markdown_table,
    pipeline_files,
    report_markdown,
    write_png,
    write_text,
)
from minidream.files import prove_writable, write_errors
from minidream.io.eval_models import load_clip, load_dino, model_files
from minidream.io.tensor_files import WeightsError
from minidream.io.weights import load_pipeline
from minidream.models.pipeline import Pipeline
from minidream.models.preprocess import preprocess
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.vision import CLIPModel, ViTModel
from minidream.sampling_flags import (
    Sampling,
    add_sampling_flags,
    check_flags_fit,
    check_image_size_flags,
    check_sampling_flags,
    device_and_dtype,
    draw,
    fill_model_defaults,
    use_flag_spacing,
    lora_hashes,
    parameters_text,
    sampling_of,
)
from minidream.training.data import DataError, find_images, load_image

# --- The metric math: pure functions of embeddings ---------------------------------------------


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """N x D and M x D embeddings -> N x M cosine similarities, in fp32."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean of cos(a_i, b_j) over every pair (DINO and CLIP-I, a = generated, b = real)."""
    return cosine_matrix(a, b).mean().item()


def mean_distinct_pairwise_cosine(a: torch.Tensor) -> float | None:
    """The mean of cos(a_i, a_j) over pairs of different images of one set (the paper's "real
    images" row: how alike the subject's own photos are); None for fewer than two."""
    n = a.shape[0]
    if n < 2:
        return None
    similarities = cosine_matrix(a, a)
    return ((similarities.sum() - similarities.diagonal().sum()) / (n * (n - 1))).item()


def mean_text_image_cosine(text: torch.Tensor, images: torch.Tensor) -> float:
    """One prompt's CLIP-T: the mean of cos(text, image_k), text 1 x D or D, images K x D."""
    return cosine_matrix(text.reshape(1, -1), images).mean().item()


# --- Models and embeddings ---------------------------------------------------------------------


@dataclass
class EvalModels:
    """The evaluation models with their tokenizer and image processors."""

    clip: CLIPModel
    dino: ViTModel
    tokenizer: CLIPTokenizer
    clip_preprocess: ImagePreprocessConfig
    dino_preprocess: ImagePreprocessConfig

    @property
    def device(self) -> torch.device:
        return self.clip.visual_projection.weight.device


def load_eval_models(clip: str | Path, dino: str | Path, device=None, dtype: torch.dtype | None = None) -> EvalModels:
    """Both evaluation models, read from their files (see io/eval_models.py), frozen."""
    clip_model = load_clip(clip, device, dtype)
    dino_model = load_dino(dino, device, dtype)
    return eval_models(clip_model, dino_model)


def eval_models(clip: CLIPModel, dino: ViTModel) -> EvalModels:
    """Pair the models with their processors, sized to each model's input (224 for the real ones)."""
    clip_size, dino_size = clip.config.vision.image_size, dino.config.image_size
    return EvalModels(
        clip=clip,
        dino=dino,
        tokenizer=CLIPTokenizer(context_length=clip.config.text.context_length),
        clip_preprocess=dataclasses.replace(CLIP_PREPROCESS, size=clip_size, crop_size=clip_size),
        dino_preprocess=dataclasses.replace(DINO_PREPROCESS, size=dino_size),
    )


@dataclass
class ImageEmbeddings:
    """N images' DINO (N x 384 for ViT-S/16) and CLIP (N x projection_dim) embeddings, fp32."""

    dino: torch.Tensor
    clip: torch.Tensor


@torch.no_grad()
def embed_images(models: EvalModels, images: Sequence[Image.Image], batch_size: int = 16, progress: tqdm | None = None) -> ImageEmbeddings:
    dino, clip = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        dino.append(models.dino.cls_embedding(preprocess(batch, models.dino_preprocess).to(models.device)).float())
        clip.append(models.clip.image_features(preprocess(batch, models.clip_preprocess).to(models.device)).float())
        if progress is not None:
            progress.update(len(batch))
    return ImageEmbeddings(torch.cat(dino), torch.cat(clip))


@torch.no_grad()
def embed_texts(models: EvalModels, prompts: Sequence[str]) -> torch.Tensor:
    """P prompts -> P x projection_dim CLIP text embeddings, fp32."""
    return models.clip.text_features(models.tokenizer(list(prompts)).to(models.device)).float()


def subject_images(folder: str | Path) -> list[Image.Image]:
    """The real photos of the subject, upright RGB; DataError (one line) if there are none."""
    paths = find_images(folder, "subject")
    if not paths:
        raise DataError(f"subject folder {folder} holds no images; put the subject's photos there")
    return [load_image(path) for path in paths]


def clip_t_prompt(prompt: str, identifier: str, keep_identifier: bool = False) -> str:
    """The text CLIP-T scores a prompt with: the prompt without its identifier word (see the top)."""
    return prompt if keep_identifier else " ".join(word for word in prompt.split(" ") if word != identifier)


# --- The measurement ---------------------------------------------------------------------------


@dataclass
class PromptScores:
    prompt: str
    clip_t_prompt: str
    dino: float
    clip_i: float
    clip_t: float


@dataclass
class Scores:
    dino: float
    clip_i: float
    clip_t: float
    per_prompt: list[PromptScores]

    @classmethod
    def of(cls, per_prompt: list[PromptScores]) -> "Scores":
        """The overall scores: the means of the per-prompt ones (equal images per prompt)."""
        means = {name: sum(getattr(p, name) for p in per_prompt) / len(per_prompt) for name in SCORES}
        return cls(per_prompt=per_prompt, **means)


def image_seeds(seed: int, images_per_prompt: int) -> list[int]:
    """Image k of every prompt uses seed + k: each prompt starts from the same K noises."""
    return [seed + k for k in range(images_per_prompt)]


def generate_images(
    pipe: Pipeline, prompts: Sequence[str], images_per_prompt: int, seed: int, sampling: Sampling, show_progress: bool = False
) -> list[list[Image.Image]]:
    """images[p][k]: prompt p's image k, drawn in batches of sampling.batch_size across prompts."""
    jobs = [(p, s) for p in range(len(prompts)) for s in image_seeds(seed, images_per_prompt)]
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(jobs), sampling.batch_size), desc="sampling", unit="batch", disable=not show_progress):
        batch = jobs[start : start + sampling.batch_size]
        images += draw(pipe, [prompts[p] for p, _ in batch], [s for _, s in batch], sampling)
    return [images[p * images_per_prompt : (p + 1) * images_per_prompt] for p in range(len(prompts))]


def score_images(
    models: EvalModels, real: ImageEmbeddings, images: Sequence[Sequence[Image.Image]], prompts: Sequence[str],
    clip_t_prompts: Sequence[str], batch_size: int = 16, show_progress: bool = False,
) -> Scores:  # fmt: skip
    """The scores of images[p][k] generated for prompts[p], against the real photos' embeddings."""
    flat = [image for group in images for image in group]
    with tqdm(total=len(flat), desc="embedding", unit="image", disable=not show_progress) as bar:
        generated = embed_images(models, flat, batch_size, bar)
    texts = embed_texts(models, clip_t_prompts)
    per_prompt, start = [], 0
    for p, group in enumerate(images):
        rows = slice(start, start + len(group))
        start += len(group)
        per_prompt.append(
            PromptScores(
                prompt=prompts[p],
                clip_t_prompt=clip_t_prompts[p],
                dino=mean_pairwise_cosine(generated.dino[rows], real.dino),
                clip_i=mean_pairwise_cosine(generated.clip[rows], real.clip),
                clip_t=mean_text_image_cosine(texts[p], generated.clip[rows]),
            )
        )
    return Scores.of(per_prompt)


def evaluate(
    pipe: Pipeline, models: EvalModels, real: ImageEmbeddings, prompts: Sequence[str], identifier: str = "sks",
    images_per_prompt: int = 4, seed: int = 0, sampling: Sampling = Sampling(), keep_identifier: bool = False,
    eval_batch_size: int = 16, show_progress: bool = False,
) -> tuple[Scores, list[list[Image.Image]]]:  # fmt: skip
    """Draw images_per_prompt images per prompt with `pipe` and score them: (scores, images[p][k]).

    `real` is `embed_images(models, subject_images(folder))`, computed once per subject.
    """
    images = generate_images(pipe, prompts, images_per_prompt, seed, sampling, show_progress)
    clip_t_prompts = [clip_t_prompt(prompt, identifier, keep_identifier) for prompt in prompts]
    return score_images(models, real, images, prompts, clip_t_prompts, eval_batch_size, show_progress), images


# --- The command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m minidream.evaluate",
        description="The DreamBooth paper's DINO, CLIP-I and CLIP-T scores of a fine-tuned model, or --compare several.",
    )
    parser.add_argument("--compare", nargs="+", type=Path, metavar="EVAL_JSON", help="print a table of these eval.json files and exit")
    parser.add_argument("--weights", help="the fine-tuned model: SD 1.x file, diffusers folder or train.py run folder")
    parser.add_argument("--subject-dir", type=Path, help="the real photos of the subject")
    parser.add_argument("--class-noun", help="the subject's class, as in the prompts (dog, backpack, stuffed animal, ...)")
    parser.add_argument("--identifier", default="sks", help="the rare token the subject was trained with (default: %(default)s)")
    parser.add_argument("--clip", type=Path, help="CLIP: a transformers CLIPModel folder or an open_clip .safetensors file")
    parser.add_argument("--dino", type=Path, help="DINO ViT-S/16: a transformers ViTModel folder (facebook/dino-vits16)")
    parser.add_argument(
        "--prompts", default=None,
        help="'object', 'live' (the paper's 25 prompts) or a file with one prompt per line, {0} = identifier, "
        "{1} = class noun (default: live for dog/cat, object otherwise)",
    )  # fmt: skip
    parser.add_argument("--images-per-prompt", type=int, default=4, help="default: %(default)s, as the paper")
    parser.add_argument(
        "--clip-t-identifier", choices=("drop", "keep"), default="drop",
        help="score CLIP-T with the prompt without the identifier (default) or as sampled",
    )  # fmt: skip
    parser.add_argument("--eval-batch-size", type=int, default=16, help="images per evaluation-model forward (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="output folder: eval.json, eval.md, contact_sheet.png, images/")
    add_sampling_flags(parser)
    parser.set_defaults(batch_size=4)
    args = parser.parse_args(argv)
    if args.compare:
        return args
    for flag in ("weights", "subject_dir", "class_noun", "clip", "dino", "out"):
        if getattr(args, flag) is None:
            parser.error(f"--{flag.replace('_', '-')} is required (or use --compare)")
    if args.images_per_prompt < 1 or args.eval_batch_size < 1:
        parser.error("--images-per-prompt and --eval-batch-size must be at least 1")
    check_sampling_flags(parser, args)
    return args


def read_prompt_templates(choice: str | None, class_noun: str) -> tuple[str, list[str]]:
    """(the list's name, its templates): a built-in list or a prompt file; ValueError otherwise."""
    name = choice or ("live" if class_noun in LIVE_CLASSES else "object")
    if name in PROMPT_LISTS:
        return name, list(PROMPT_LISTS[name])
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--prompts {name}: not 'object', 'live' or an existing prompt file")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not templates:
        raise ValueError(f"--prompts {name}: the file holds no prompts")
    return str(path), templates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.compare:
            print(compare_table(args.compare), end="")
            return 0
        job = prepare(args)
        run(args, job)
    except (ValueError, OSError) as error:  # WeightsError, DataError, ConfigError; WriteError (a full disk): one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


@dataclass
class Job:
    """Everything a run needs, read and checked before the first image is drawn."""

    prompt_list: str
    prompts: list[str]
    real_images: list[Image.Image]
    models: EvalModels
    pipe: Pipeline
    sampling: Sampling


def prepare(args: argparse.Namespace) -> Job:
    """Read the prompts, the photos and every model; ValueError (one line) for what is wrong."""
    device, dtype = device_and_dtype(args)
    check_image_size_flags(args)  # before any model loads
    prompt_list, templates = read_prompt_templates(args.prompts, args.class_noun)
    real_images = subject_images(args.subject_dir)
    # The evaluation models are small: fp32, whatever the sampling dtype.
    models = eval_models(_load("--clip", load_clip, args.clip, device), _load("--dino", load_dino, args.dino, device))
    pipe = load_pipeline(args.weights, device=device, dtype=dtype, loras=args.lora, prediction_type=args.prediction_type)
    check_flags_fit(args, pipe)  # refuses e.g. too many steps
    fill_model_defaults(args, pipe.config)  # the family's size and guidance, as the images and eval.json record them
    use_flag_spacing(args, pipe)
    prove_writable(args.out)  # WriteError now rather than after the images are drawn
    sampling = sampling_of(args)
    prompts = subject_prompts(templates, args.identifier, args.class_noun)
    return Job(prompt_list, prompts, real_images, models, pipe, sampling)


def run(args: argparse.Namespace, job: Job) -> None:
    print(f"{len(job.prompts)} prompts ({job.prompt_list}) x {args.images_per_prompt} images; {len(job.real_images)} real photos")
    real = embed_images(job.models, job.real_images, args.eval_batch_size)
    scores, images = evaluate(
        job.pipe, job.models, real, job.prompts, args.identifier, args.images_per_prompt, args.seed, job.sampling,
        keep_identifier=args.clip_t_identifier == "keep", eval_batch_size=args.eval_batch_size, show_progress=True,
    )  # fmt: skip
    write_outputs(args, job.prompt_list, scores, images, job.real_images, real)
    print(markdown_table([("this run", scores.dino, scores.clip_i, scores.clip_t), *PAPER_TABLE]), end="")
    print(f"wrote {args.out}/eval.json, eval.md, contact_sheet.png and {sum(map(len, images))} images")


def _load(flag: str, loader, path: Path, device: torch.device):
    """loader(path), its one-line error prefixed with the flag that named the file."""
    try:
        return loader(path, device, torch.float32)
    except WeightsError as error:
        raise WeightsError(f"{flag}: {error}") from None


def write_outputs(
    args: argparse.Namespace, prompt_list: str, scores: Scores, images: list[list[Image.Image]],
    real_images: list[Image.Image], real: ImageEmbeddings,
) -> None:  # fmt: skip
    out = args.out
    with write_errors(out / "images"):
        (out / "images").mkdir(parents=True, exist_ok=True)
    seeds, hashes = image_seeds(args.seed, args.images_per_prompt), lora_hashes(args)
    per_prompt = []
    for p, (group, score) in enumerate(zip(images, scores.per_prompt)):
        names = [f"images/{p}-{k}.png" for k in range(len(group))]
        for name, image, seed in zip(names, group, seeds):
            write_png(out / name, image, parameters_text(args, score.prompt, seed, hashes))
        per_prompt.append({**dataclasses.asdict(score), "images": names})
    settings = {
        "weights": str(args.weights), "subject_dir": str(args.subject_dir), "class_noun": args.class_noun,
        "identifier": args.identifier, "prompts": prompt_list, "images_per_prompt": args.images_per_prompt,
        "seed": args.seed, "steps": args.steps, "sampler": args.sampler, "karras": args.karras,
        "guidance": args.guidance, "guidance_rescale": args.guidance_rescale, "clip_skip": args.clip_skip,
        "eta": args.eta, "height": args.height, "width": args.width,
        "negative_prompt": args.negative_prompt, "dtype": str(device_and_dtype(args)[1]).removeprefix("torch."),
        "clip_t_identifier": args.clip_t_identifier, "clip": str(args.clip), "dino": str(args.dino),
        "loras": [{"path": str(path), "scale": scale} for path, scale in args.lora],
    }  # fmt: skip
    result = {
        "dino": scores.dino, "clip_i": scores.clip_i, "clip_t": scores.clip_t, "per_prompt": per_prompt,
        "real_images": len(real_images),
        "real_vs_real": {"dino": mean_distinct_pairwise_cosine(real.dino), "clip_i": mean_distinct_pairwise_cosine(real.clip)},
        "settings": settings, "minidream_version": minidream.__version__,
        "sha256": {
            "weights": file_hashes(pipeline_files(Path(args.weights))),
            "clip": file_hashes(model_files(args.clip)), "dino": file_hashes(model_files(args.dino)),
            **({"loras": file_hashes([path for path, _ in args.lora])} if args.lora else {}),
        },
    }  # fmt: skip
    write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
    write_text(out / "eval.md", report_markdown(result))
    write_png(out / "contact_sheet.png", contact_sheet(real_images, images))


if __name__ == "__main__":
    sys.exit(main())
