"""DreamBooth fine-tuning of Stable Diffusion 1.x (Ruiz et al. 2023), hand-written.

    python train.py                                   # the embedded default: a tiny model on the CPU
    python train.py --config configs/dreambooth-sd15.yaml model.weights=... data.instance_dir=...
    torchrun --nproc_per_node=8 train.py --config ...  # the same on 8 GPUs

The whole loop is in `train()` below, top to bottom; the pieces are tested functions of the
minidream package.
"""

import argparse
import contextlib
import dataclasses
import functools
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minidream.config import (
    ARCHITECTURES,
    ConfigError,
    ScheduleConfig,
    TrainConfig,
    to_dict,
)
from minidream.diffusion import schedule
from minidream.diffusion.sampling import generate, image_grid
from minidream.dreambooth_prompts import (
    subject_prompts,
)
from minidream.evaluate import (
    Sampling,
    Scores,
    embed_images,
    evaluate,
    load_eval_models,
    read_prompt_templates,
    subject_images,
)
from minidream.files import atomic_file
from minidream.io.lora_files import (
    kohya_settings,
    lora_merged,
    read_lora_file,
    save_lora,
)
from minidream.io.weights import WeightsError, load_pipeline, save_pipeline
from minidream.models.lora import add_lora, train_adapters_only
from minidream.models.pipeline import Pipeline, random_pipeline
from minidream.models.precision import dtype_named, vae_dtype
from minidream.training import checkpoint, sharded_checkpoint, sharding
from minidream.training.batches import (
    DreamBoothBatches,
    LatentSource,
    MomentsInMemory,
    PromptEncoder,
)
from minidream.training.buckets import bucket_sizes, proportional_sizes
from minidream.training.checkpoint import CheckpointError, TrainerState
from minidream.training.config_file import load_train_config, save_config
from minidream.training.data import DataError, find_images
from minidream.training.distributed import (
    Distributed,
    Heartbeat,
    any_rank,
    barrier,
    gather_objects,
    init_distributed,
    restart_resume,
    shutdown,
    timed_out,
)
from minidream.training.ema import EMA
from minidream.training.example_subject import write_example_subject
from minidream.training.latent_cache import LatentCache, check_writable_folder
from minidream.training.metrics import MetricsLog, PendingSteps
from minidream.training.optimizers import FusedBackward, OptimizerError, make_optimizer
from minidream.training.plan import DataPlan, pair_classes, plan_items
from minidream.training.prior import generate_class_images, missing_class_indices
from minidream.training.recipe import (
    Recipe,
    draw_noise,
    noisy_latents_and_target,
    recipe_loss,
    sample_losses,
)
from minidream.training.signals import StopRequest
from minidream.training.step import (
    lr_factor,
    step_unless,
    take_items,
    to_device,
)
from minidream.training.subjects import (
    Subject,
    class_count,
    class_sets,
    scan_classes,
    scan_subject,
    subjects_of,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DreamBooth fine-tuning of Stable Diffusion 1.x. Without --config, runs the embedded "
        "default (configs/tiny.yaml: a tiny model on a drawn example subject, seconds on a CPU).",
        epilog="Overrides are section.key=value, e.g. train.max_steps=400 data.instance_dir=photos/dog "
        "run.resume=latest. --show-config prints every key with its value.",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML preset (default: %(default)s)")
    parser.add_argument("--show-config", action="store_true", help="print the resolved config (every key) and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied in order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.show_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        env = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    except (ConfigError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    heartbeat = Heartbeat(env, cfg.train.collective_timeout_s) if env.world_size > 1 else None
    try:
        return train(cfg, env, resume_command(argv, env))
    except (ConfigError, DataError, WeightsError, CheckpointError, OptimizerError) as error:
        print(f"error (rank {env.rank}): {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # gloo raises a plain RuntimeError when a collective times out
        if heartbeat is None or not timed_out(error):
            raise
        print(f"error (rank {env.rank}): {heartbeat.explain(cfg.train.collective_timeout_s)}", file=sys.stderr)
        return 3
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        shutdown()


def log(env: Distributed, message: str) -> None:
    if env.is_main:
        tqdm.write(message)


def resume_command(argv: list[str], env: Distributed) -> str:
    """The command that continues this run: the same arguments, with run.resume=latest."""
    launcher = "python train.py" if env.world_size == 1 else "torchrun <same options> train.py"
    return " ".join([launcher, *(shlex.quote(a) for a in argv if not a.startswith("run.resume=")), "run.resume=latest"])


def prepare_run_dir(cfg: TrainConfig, env: Distributed) -> Path:
    """Create the output folder and prove it writable before anything expensive happens."""
    run_dir = Path(cfg.run.output_dir)
    if env.is_main:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise CheckpointError(f"run.output_dir {run_dir} is not writable ({error.strerror or error})") from None
    barrier()
    return run_dir


def load_models(cfg: TrainConfig, env: Distributed) -> Pipeline:
    if cfg.model.weights:
        return load_pipeline(cfg.model.weights, device=env.device, dtype=torch.float32, use_ema=cfg.model.use_ema)
    log(env, f"model.weights is not set: starting from random {cfg.model.architecture} weights (seed {cfg.train.seed})")
    return random_pipeline(ARCHITECTURES[cfg.model.architecture], seed=cfg.train.seed).to(env.device)


def ensure_class_images(
    cfg: TrainConfig, env: Distributed, pipe: Pipeline, amp, subjects: list[Subject], plan: DataPlan, wanted: dict[str, int]
) -> None:
    """Generate the class images prior preservation needs, once per class folder, split across ranks;
    with buckets at the bucket sizes, in the proportions of the instance images of the subjects sharing it."""
    data = cfg.data
    for folder, sharing in class_sets(subjects).items():
        missing = missing_class_indices(Path(folder), wanted[folder]) if env.is_main else None
        missing = gather_objects(missing)[0]
        if not missing:
            continue
        prompt = subjects[sharing[0]].class_prompt
        sizes = proportional_sizes(max(missing) + 1, plan.bucket_counts(sharing)) if data.buckets else None
        log(env, f"generating {len(missing)} class images of {prompt!r} into {folder}")
        with amp():
            generate_class_images(
                pipe, Path(folder), prompt, missing[env.rank :: env.world_size], data.resolution,
                data.class_steps, data.class_guidance, data.class_sampler, data.class_batch_size, env.is_main, sizes=sizes,
            )
    barrier()


def validation_prompts(cfg: TrainConfig, subjects: list[Subject]) -> list[str]:
    """validation.prompts, plus the instance prompt of each listed subject that none of them names
    (by its identifier, else its instance prompt), so every subject is seen."""
    prompts = list(cfg.validation.prompts)
    if prompts and cfg.data.subjects:
        prompts += [s.instance_prompt for s in subjects if not any((s.identifier or s.instance_prompt) in p for p in prompts)]
    return prompts


def save_validation_grid(
    cfg: TrainConfig, pipe: Pipeline, run_dir: Path, step: int, amp, prompts: list[str], sizes: list[tuple[int, int]],
    write: bool = True,
) -> None:
    """One grid of the prompts per training size (each bucket that trains; the square resolution
    without buckets). `write`: save the grids (the main rank; under fsdp every rank samples)."""
    val = cfg.validation
    pipe.unet.eval()
    for width, height in sizes:
        with amp():
            images = generate(
                pipe, prompts, seeds=[val.seed + i for i in range(len(prompts))], steps=val.steps,
                guidance=val.guidance, guidance_rescale=val.guidance_rescale, clip_skip=cfg.model.clip_skip,
                height=height, width=width,
            )
        name = f"step-{step:08d}.png" if len(sizes) == 1 else f"step-{step:08d}-{width}x{height}.png"
        if write:
            with atomic_file(run_dir / "samples" / name) as tmp:
                image_grid(images, columns=min(4, len(images))).save(tmp, format="PNG")
    pipe.unet.train()


def moments_store(cfg: TrainConfig, pipe: Pipeline):
    """Where encoded images are kept (batches.py): on disk with data.latent_cache_dir, in memory when
    train.cache_latents and the transforms draw nothing, else nowhere (encoded every time)."""
    data = cfg.data
    if data.latent_cache_dir is not None:
        return LatentCache(Path(data.latent_cache_dir), pipe.vae)
    if cfg.train.cache_latents and data.center_crop and not data.random_flip:
        return MomentsInMemory()
    return None


def check_bucket_sides(plan: DataPlan, pipe: Pipeline) -> None:
    """Each bucket's latent must halve cleanly at every UNet level (SD: sides divisible by 64)."""
    factor = 2 ** (len(pipe.config.vae.channel_mult) - 1) * 2 ** (len(pipe.config.unet.channel_mult) - 1)
    for width, height in plan.bucket_counts():
        if width % factor or height % factor:
            raise ConfigError(f"data.bucket_step: bucket {width}x{height} has a side this model cannot take; "
                              f"it needs multiples of {factor} (set data.bucket_step={factor})")


def training_schedule(cfg: TrainConfig, pipe: Pipeline) -> ScheduleConfig:
    """The noise schedule this run trains with. It goes into pipe.config, so the validation grids
    and the exported model (its metadata, or its scheduler config) sample with what was trained."""
    sched = pipe.config.schedule
    sched = dataclasses.replace(
        sched, prediction_type=cfg.train.prediction_type or sched.prediction_type,
        rescale_betas_zero_snr=sched.rescale_betas_zero_snr or cfg.model.zero_terminal_snr,
    )
    if sched.rescale_betas_zero_snr and sched.prediction_type != "v_prediction":
        raise ConfigError(
            "model.zero_terminal_snr needs a v-prediction target: at zero SNR the noise cannot be predicted from "
            "pure noise (Lin et al. 2024, sec. 3.2); set train.prediction_type=v_prediction"
        )
    if cfg.train.max_timestep is not None and cfg.train.max_timestep > sched.num_train_timesteps:
        raise ConfigError(f"train.max_timestep={cfg.train.max_timestep}, but the model has {sched.num_train_timesteps} timesteps")
    pipe.config = dataclasses.replace(pipe.config, schedule=sched)
    return sched


def prepare_models(cfg: TrainConfig, pipe: Pipeline, amp_dtype: torch.dtype) -> tuple[dict[str, nn.Module], list[dict]]:
    """Freeze what does not train, in the AMP dtype (the VAE by the one VAE-dtype rule); with
    lora.rank add the adapters (fp32, the base frozen in the AMP dtype); then recompute and
    compile. Returns the trained modules by checkpoint name, and the optimizer's parameter groups."""
    tcfg, lora = cfg.train, cfg.lora
    text_encoder_lr = tcfg.text_encoder_lr or tcfg.lr
    pipe.vae.requires_grad_(False).to(dtype=vae_dtype(amp_dtype))  # fp16 keeps an fp32 VAE: its decoder overflows fp16
    trained = {"unet": pipe.unet}
    if lora.rank:
        add_lora(pipe.unet, lora.targets, lora.rank, lora.alpha, lora.dropout, generator=lora.init_seed)
        groups = [{"params": train_adapters_only(pipe.unet, amp_dtype), "lr": tcfg.lr}]
        if lora.text_encoder_rank:  # kohya's text-encoder targets (attention and MLP), same alpha
            add_lora(pipe.text_encoder, "all", lora.text_encoder_rank, lora.alpha, lora.dropout, generator=lora.init_seed + 1)
            groups.append({"params": train_adapters_only(pipe.text_encoder, amp_dtype), "lr": text_encoder_lr})
            trained["text_encoder"] = pipe.text_encoder
    else:
        groups = [{"params": list(pipe.unet.parameters()), "lr": tcfg.lr}]
        if tcfg.train_text_encoder:
            groups.append({"params": list(pipe.text_encoder.parameters()), "lr": text_encoder_lr})
            trained["text_encoder"] = pipe.text_encoder
    if "text_encoder" not in trained:
        pipe.text_encoder.requires_grad_(False).to(dtype=amp_dtype)
    pipe.unet.gradient_checkpointing = tcfg.gradient_checkpointing
    if tcfg.compile:  # in place: parameter names, DDP and checkpoints see the same module
        pipe.unet.compile(fullgraph=True)
    for module in trained.values():
        module.train()  # LoRA dropout acts in training mode only
    return trained, groups


def run_setup(cfg: TrainConfig, pipe: Pipeline, trained: dict[str, nn.Module]) -> dict:
    """What a resumed run must share with its checkpoint; options at their defaults are left out."""
    setup = {"architecture": repr(pipe.config.unet), "trained": sorted(trained)}
    if cfg.lora.rank:
        lora = cfg.lora
        setup["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "text_encoder_rank": lora.text_encoder_rank}
    if cfg.train.ema_decay is not None:
        setup["ema"] = True
    if cfg.train.fused_backward or cfg.train.optimizer != "adamw":  # another optimizer state format
        setup["optimizer"] = f"{cfg.train.optimizer}{' fused_backward' if cfg.train.fused_backward else ''}"
    data = cfg.data
    if data.subjects or data.buckets:  # they decide the data order the checkpoint's cursor points into
        setup["data"] = {
            "subjects": [[s.name or Path(s.instance_dir).name, s.repeats] for s in data.subjects],
            "buckets": [data.resolution, data.bucket_step, data.max_aspect] if data.buckets else None,
        }
    return setup


@contextlib.contextmanager
def weights_as_exported(cfg: TrainConfig, pipe: Pipeline, ema: EMA | None, run_dir: Path, num_instance: int, num_class: int):
    """`pipe` holding the weights the run exports, for the block: the EMA's (run.export_ema=ema)
    and, with LoRA, the adapters written to lora.safetensors and merged back into the base the way
    the UIs merge them, so a validation grid shows what ComfyUI or A1111 will. Yields the LoRA
    file (None without LoRA); afterwards every weight is as it was."""
    with exported_ema(cfg, ema):
        if not cfg.lora.rank:
            yield None
            return
        path = run_dir / "lora.safetensors"
        text_encoder = pipe.text_encoder if cfg.lora.text_encoder_rank else None
        save_lora(path, pipe.unet, text_encoder, settings=kohya_settings(cfg, num_instance, num_class))
        with lora_merged(pipe, read_lora_file(path, pipe.config)):
            yield path


def export_model(cfg: TrainConfig, pipe: Pipeline, ema: EMA | None, run_dir: Path, num_instance: int, num_class: int) -> Path:
    """Write the run's result: model.safetensors (SD single file), or with LoRA lora.safetensors,
    plus the merged model when run.export_merged is set or the base is not a file (random weights)."""
    with weights_as_exported(cfg, pipe, ema, run_dir, num_instance, num_class) as lora_file:
        if lora_file is None or cfg.run.export_merged or not cfg.model.weights:
            # export_ema=both: the raw weights as the model, the UNet's EMA beside them (LDM has no text-encoder EMA).
            unet_ema = None
            if ema is not None and cfg.run.export_ema == "both":
                unet_ema = {name.removeprefix("unet."): t for name, t in ema.state_dict()["shadow"].items() if name.startswith("unet.")}
            save_pipeline(pipe, run_dir / "model.safetensors", dtype=dtype_named(cfg.run.export_dtype), unet_ema=unet_ema)
    return lora_file or run_dir / "model.safetensors"


def export_sharded(cfg: TrainConfig, env: Distributed, pipe: Pipeline, trained: dict[str, nn.Module], ema, run_dir: Path) -> Path:
    """export_model for FSDP-sharded modules (all ranks call): the weights run.export_ema picks are
    gathered one tensor at a time to the main rank, which writes them from unsharded twins."""
    shadow = ema.sharded_shadow() if ema is not None else {}
    twins = {}
    for name, module in trained.items():
        weights = {f"{name}.{key}": value for key, value in module.state_dict().items()}
        if cfg.run.export_ema == "ema":  # the EMA's tensors in place of the raw weights they average
            weights |= {key: value for key, value in shadow.items() if key.startswith(f"{name}.")}
        full = sharding.gathered(weights, env.is_main)
        twins[name] = sharding.plain_twin(module, {k.removeprefix(f"{name}."): v for k, v in full.items()}) if env.is_main else None
    unet_ema = None
    if cfg.run.export_ema == "both" and shadow:
        unet_ema = sharding.gathered({k.removeprefix("unet."): v for k, v in shadow.items() if k.startswith("unet.")}, env.is_main)
    path = run_dir / "model.safetensors"
    if env.is_main:
        exported = dataclasses.replace(pipe, unet=twins["unet"], text_encoder=twins.get("text_encoder", pipe.text_encoder))
        save_pipeline(exported, path, dtype=dtype_named(cfg.run.export_dtype), unet_ema=unet_ema)
    return path


def evaluation_prompts(cfg: TrainConfig, subject: Subject) -> list[str]:
    """eval.prompts, or the first eval.num_prompts of the paper's list for the subject's class noun."""
    ev = cfg.eval
    if ev.prompts:
        return list(ev.prompts)
    identifier, noun = subject.identifier or ev.identifier, subject.class_noun or ev.class_noun
    _, templates = read_prompt_templates(None, noun)  # the list evaluate picks for the noun
    return subject_prompts(templates, identifier, noun)[: ev.num_prompts]


def evaluate_subjects(
    cfg: TrainConfig, env: Distributed, pipe: Pipeline, ema: EMA | None, amp, amp_dtype, subjects: list[Subject]
) -> dict:
    """The DreamBooth paper's DINO, CLIP-I and CLIP-T of the weights as they would be exported:
    `dino`, `clip_i`, `clip_t` over every subject's prompts, and with data.subjects each subject's
    own as `dino/<name>` etc. (its photos, its identifier, the paper's prompts for its class noun).

    The ranks split each subject's prompts and every rank gets the means; the evaluation models are
    loaded in the AMP dtype for this call only, so they cost no memory between evaluations.
    """
    ev, resolution = cfg.eval, cfg.data.resolution
    models = load_eval_models(ev.clip, ev.dino, device=env.device, dtype=amp_dtype)
    sampling = Sampling(steps=ev.steps, guidance=ev.guidance, height=resolution, width=resolution)
    record, every_prompt = {}, []
    for subject in subjects:
        mine = evaluation_prompts(cfg, subject)[env.rank :: env.world_size]
        per_prompt = []
        if mine:
            real = embed_images(models, subject_images(subject.instance_dir))
            pipe.unet.eval()
            with exported_ema(cfg, ema), amp():
                scores, _ = evaluate(pipe, models, real, mine, subject.identifier or ev.identifier, ev.images_per_prompt, ev.seed, sampling)
            pipe.unet.train()
            per_prompt = scores.per_prompt
        gathered = [p for shard in gather_objects(per_prompt) for p in shard]
        every_prompt += gathered
        if cfg.data.subjects:
            own = Scores.of(gathered)
            record |= {f"dino/{subject.name}": own.dino, f"clip_i/{subject.name}": own.clip_i, f"clip_t/{subject.name}": own.clip_t}
    del models
    scores = Scores.of(every_prompt)
    return record | {"dino": scores.dino, "clip_i": scores.clip_i, "clip_t": scores.clip_t}


def exported_ema(cfg: TrainConfig, ema: EMA | None):
    """The EMA weights swapped in for the block when they are what the run exports (run.export_ema=ema)."""
    return ema.swapped_in() if ema is not None and cfg.run.export_ema == "ema" else contextlib.nullcontext()


def save_checkpoint_all_ranks(env: Distributed, run_dir: Path, state: TrainerState, keep_last: int, sharded: bool) -> Path | None:
    """Every rank hands over its RNG states; the main rank writes the checkpoint (its folder is
    returned there) — or, `sharded`, every rank writes its shards into it (DCP)."""
    rng = gather_objects(checkpoint.capture_rng())
    if sharded:
        return sharded_checkpoint.save_sharded(run_dir, state, rng, env.is_main, keep_last)
    saved = None
    if env.is_main:
        saved = checkpoint.save_checkpoint(run_dir, state, rng)
        checkpoint.rotate(run_dir, keep_last)
    barrier()
    return saved


def resume_checkpoint(path: Path, state: TrainerState, env: Distributed, fsdp: bool) -> None:
    """Load a checkpoint of either format into this run's layout (DCP reshards; a DDP checkpoint is split into shards)."""
    if sharded_checkpoint.is_sharded_checkpoint(path):
        sharded_checkpoint.load_sharded(path, state, env.rank, env.world_size)
    elif fsdp:
        sharded_checkpoint.load_whole_into_sharded(path, state, env.rank, env.world_size)
    else:
        checkpoint.load_checkpoint(path, state, env.rank, env.world_size)


def train(cfg: TrainConfig, env: Distributed, resume_hint: str) -> int:
    tcfg, data = cfg.train, cfg.data
    run_dir = prepare_run_dir(cfg, env)
    amp_dtype = dtype_named(tcfg.mixed_precision)

    def amp():
        return torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    # 1. Data and setting problems surface before any model is loaded.
    if tcfg.fused_backward and env.world_size > 1:
        raise ConfigError("train.fused_backward steps each weight before DDP has averaged its gradient: run it in one process")
    sharding.refuse_unsupported(cfg)
    sharded = sharding.uses_fsdp(cfg)  # checkpoints written with DCP; with 2+ ranks the trained weights FSDP-sharded
    fsdp = sharded and env.world_size > 1
    earlier = checkpoint.list_checkpoints(run_dir)  # once: it also warns about interrupted writes
    resume = restart_resume(cfg.run.resume, bool(earlier))
    subjects = subjects_of(cfg)
    if data.example_subject and not data.subjects and env.is_main:  # config_file.with_instance_dir: its own folder in the run directory
        write_example_subject(Path(data.instance_dir), count=4, size=max(data.resolution, 64))
    barrier()
    buckets = bucket_sizes(data.resolution, data.bucket_step, data.max_aspect) if data.buckets else None
    instance_sets = [scan_subject(subject, data, buckets) for subject in subjects]
    prior = subjects[0].class_dir is not None  # subjects_of: for every subject, or none
    shared = class_sets(subjects)
    wanted = {folder: max(subjects[i].num_class_images for i in sharing) for folder, sharing in shared.items()}
    for folder, sharing in shared.items():
        if Path(folder).is_dir() and find_images(folder, "class"):  # class images already there must be usable too
            scan_classes(folder, subjects[sharing[0]], data, buckets)

    def plan_of(class_counts: list[int]) -> DataPlan:
        return plan_items([s.name for s in subjects], instance_sets, [s.repeats for s in subjects], class_counts, buckets,
                          data.resolution, tcfg.batch_size * env.world_size)

    # The items with the class counts the folders will have: bucket problems surface now too.
    plan = plan_of([class_count(s.class_dir, wanted[s.class_dir]) if prior else 0 for s in subjects])
    if cfg.eval.every_n_steps and cfg.eval.prompts and data.subjects:
        raise ConfigError("eval.prompts with data.subjects: each subject is evaluated on the paper's prompts for its "
                          "class_noun with its identifier; leave eval.prompts empty (eval.num_prompts sets how many)")
    for flag in ("clip", "dino") if cfg.eval.every_n_steps else ():
        if not Path(getattr(cfg.eval, flag)).exists():
            raise ConfigError(f"eval.{flag}={getattr(cfg.eval, flag)}: no such file or folder (see the README, Evaluate a run)")
    if data.latent_cache_dir is not None:
        check_writable_folder(Path(data.latent_cache_dir))
    if resume == "none" and earlier:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints of an earlier run; continue it with run.resume=latest "
            "or start afresh in another run.output_dir"
        )

    # 2. Models: what trains (the UNet, or its LoRA adapters; optionally the text encoder) keeps
    #    fp32 master weights; the frozen parts run in the AMP dtype.
    pipe = load_models(cfg, env)
    if cfg.model.clip_skip > pipe.config.text_encoder.conditioning_layers:
        raise ConfigError(f"model.clip_skip={cfg.model.clip_skip}, but the text encoder has {pipe.config.text_encoder.conditioning_layers} layers")
    if data.buckets:
        check_bucket_sides(plan, pipe)
    if prior:
        ensure_class_images(cfg, env, pipe, amp, subjects, plan, wanted)
        scanned = {folder: scan_classes(folder, subjects[sharing[0]], data, buckets) for folder, sharing in shared.items()}
        class_examples = [scanned[s.class_dir] for s in subjects]
        plan = pair_classes(plan_of([len(c) for c in class_examples]), class_examples)
    if data.buckets:
        for line in plan.describe():
            log(env, line)
    sched = training_schedule(cfg, pipe)
    trained, groups = prepare_models(cfg, pipe, amp_dtype)
    text_encoder_trains = "text_encoder" in trained

    def wrap(module):
        if env.world_size == 1 or sharded:
            return module
        return DistributedDataParallel(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    if fsdp:  # in place: the modules become FSDP modules of DTensor parameters
        groups = sharding.shard(trained, groups, amp_dtype, env.device, env.world_size)
    unet = wrap(pipe.unet)
    text_encoder = wrap(pipe.text_encoder) if text_encoder_trains else pipe.text_encoder
    synced_modules = [unet, text_encoder] if text_encoder_trains else [unet]  # gradients reduced across ranks

    store = moments_store(cfg, pipe)
    latents = LatentSource(pipe.vae, data.center_crop, data.random_flip, pipe.config.vae.scaling_factor, store)
    batches = DreamBoothBatches(plan, latents, tcfg.seed, data.caption_dropout, data.masks)
    shard = functools.lru_cache(maxsize=1)(  # take_items asks every micro-step; the order changes per epoch
        functools.partial(plan.shard, seed=tcfg.seed, rank=env.rank, world_size=env.world_size))
    val_prompts = validation_prompts(cfg, subjects)
    val_sizes = sorted(plan.bucket_counts())
    encode_prompts = PromptEncoder(pipe.tokenizer, text_encoder, text_encoder_trains, cfg.model.clip_skip)
    alphas_cumprod = schedule.alphas_cumprod_of(sched).to(env.device)
    recipe = Recipe.from_config(tcfg, sched)

    # 3. Optimizer, LR schedule, loss scaler, EMA.
    def build(param_groups):
        return make_optimizer(param_groups, tcfg.optimizer, (tcfg.adam_beta1, tcfg.adam_beta2), tcfg.adam_eps, tcfg.weight_decay)

    # fused_backward: the optimizer steps inside backward, one weight at a time, its LR set per step.
    optimizer = FusedBackward(groups, build) if tcfg.fused_backward else build(groups)
    lr_schedule = None if tcfg.fused_backward else torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tcfg.lr_schedule, tcfg.warmup_steps, tcfg.max_steps)
    )
    scaler = torch.amp.GradScaler(env.device.type, enabled=tcfg.mixed_precision == "fp16")
    named = [(f"{name}.{key}", p) for name, module in trained.items() for key, p in module.named_parameters() if p.requires_grad]
    ema_class = sharding.ShardedEMA if fsdp else EMA  # sharded: the EMA of the local shards
    ema = ema_class(named, tcfg.ema_decay, tcfg.ema_warmup) if tcfg.ema_decay is not None else None

    # 4. The trainer state, saved and restored whole; resume puts everything back as it was.
    state = TrainerState(
        modules=trained, optimizer=optimizer, lr_schedule=lr_schedule, scaler=scaler, setup=run_setup(cfg, pipe, trained),
        adapters_only=cfg.lora.rank > 0, ema=ema,
    )
    resume_from = checkpoint.resolve_resume(run_dir, resume)
    if resume_from is not None:
        resume_checkpoint(resume_from, state, env, fsdp)
        log(env, f"resumed from {resume_from} at step {state.step}")
    metrics = MetricsLog(run_dir, cfg.run.tensorboard) if env.is_main else None
    subject_names = plan.subjects if data.subjects else ()
    if env.is_main:  # only now: a refused resume leaves the run directory as it was
        save_config(cfg, run_dir / "config.yaml")
        metrics.truncate_after(state.step)
    diverged_at = None

    # 5. The loop: accumulate micro-batches, clip, step; every run.log_every_n_steps steps read the
    #    metrics back, then checkpoint and validate when due. Between those reads the host never
    #    waits for the GPU: batches go over as asynchronous copies, a non-finite step is skipped by
    #    the fused optimizer itself, and the losses stay on the device (metrics.PendingSteps).
    stop = StopRequest()
    bar = tqdm(total=tcfg.max_steps, initial=state.step, desc="training", disable=not env.is_main, dynamic_ncols=True)
    accum = tcfg.gradient_accumulation_steps
    pending, window_started, window_samples = PendingSteps(subject_names), time.perf_counter(), 0
    while state.step < tcfg.max_steps:
        totals = torch.zeros(3, device=env.device)  # loss, instance loss, prior loss over micro-steps
        subject_totals = torch.zeros(2, len(subject_names), device=env.device)  # per subject: loss sum, samples
        if tcfg.fused_backward:
            optimizer.set_lr_factor(lr_factor(state.step, tcfg.lr_schedule, tcfg.warmup_steps, tcfg.max_steps))
        for micro in range(accum):
            items, state.cursor = take_items(state.cursor, tcfg.batch_size, len(batches), tcfg.seed, env.rank, env.world_size, shard)
            latents, prompts, generators, masks, subjects_onehot = batches.batch(items)
            noise, input_noise, t = draw_noise(latents.shape[1:], generators, recipe)
            perturbed = input_noise is not noise  # input perturbation: x_t from other noise than the target's
            latents, noise, t = (to_device(x, env.device) for x in (latents, noise, t))
            masks = to_device(masks, env.device) if masks is not None else None
            input_noise = to_device(input_noise, env.device) if perturbed else noise
            noisy, target = noisy_latents_and_target(latents, noise, input_noise, t, alphas_cumprod, recipe)
            # Gradients are reduced across ranks only on the last micro-step of the accumulation.
            with sharding.gradient_sync(synced_modules if env.world_size > 1 else [], micro == accum - 1):
                with amp():
                    context = encode_prompts(prompts, env.device)
                    prediction = unet(noisy, t, context)
                loss, loss_instance, loss_prior = recipe_loss(
                    prediction, target, t, alphas_cumprod, recipe, len(items), tcfg.prior_loss_weight, masks
                )
                scaler.scale(loss / accum).backward()
            totals += torch.stack([loss.detach(), loss_instance.detach(), loss_prior.detach()]) / accum
            if subject_names:  # each subject's instance samples, summed through the one-hot matrix: no host read
                onehot = to_device(subjects_onehot, env.device)
                per_sample = sample_losses(prediction.detach()[: len(items)], target[: len(items)], t[: len(items)],
                                           alphas_cumprod, recipe, masks[: len(items)] if masks is not None else None)
                subject_totals += torch.stack([per_sample @ onehot, onehot.sum(0)])
            window_samples += len(prompts) * env.world_size

        if tcfg.fused_backward:  # backward has stepped each weight; no global norm exists
            skip = optimizer.nonfinite.clone()
            optimizer.reset_nonfinite()
            grad_norm = torch.full((), float("nan"), device=env.device)
        else:
            scaler.unscale_(optimizer)
            with sharding.local_shards(optimizer, fsdp) as stepped:
                grad_norm = sharding.clip_grad_norm(stepped, tcfg.max_grad_norm or float("inf"), fsdp)  # inf: measure only
                # The same on every rank: DDP has averaged the gradients (FSDP summed the shards' squares), and a NaN loss anywhere makes them NaN.
                skip = ~torch.isfinite(grad_norm)
                step_unless(optimizer, skip)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None and (state.step + 1) % tcfg.ema_every == 0:
            ema.update(skip)  # on the device: a skipped step leaves the EMA as it was
        pending.add(state.step + 1, optimizer.param_groups[0]["lr"], totals, grad_norm, skip, subject_totals)
        if lr_schedule is not None:
            lr_schedule.step()
        state.step += 1
        bar.update(1)

        stop_now = False
        step = state.step
        evaluating = cfg.eval.every_n_steps > 0 and step % cfg.eval.every_n_steps == 0
        if step % cfg.run.log_every_n_steps == 0 or step % cfg.checkpoint.every_n_steps == 0 or step == tcfg.max_steps or evaluating:
            records = pending.read()  # the host waits for the GPU here, and only here
            samples_per_s, window_samples = window_samples / (time.perf_counter() - window_started), 0
            if evaluating:  # the scores join the step's record (and TensorBoard)
                records[-1].update(evaluate_subjects(cfg, env, pipe, ema, amp, amp_dtype, subjects))
            for record in records:
                # fp16 gradient overflow skips a step too, but only non-finite losses count towards stopping.
                state.nonfinite_run = 0 if math.isfinite(record["loss"]) else state.nonfinite_run + 1
                if state.nonfinite_run >= tcfg.max_nonfinite_steps and diverged_at is None:
                    diverged_at = record["step"]
                record["samples_per_s"] = samples_per_s  # the window's average: single steps are not timed
                if env.device.type == "cuda":
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                if env.is_main:
                    metrics.write(record)
            bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", lr=f"{records[-1]['lr']:.2e}", samples_s=f"{samples_per_s:.1f}")
            if diverged_at is not None:
                break
            stop_now = any_rank(stop.requested, env.device)
            if stop_now or step % cfg.checkpoint.every_n_steps == 0 or step == tcfg.max_steps:
                saved = save_checkpoint_all_ranks(env, run_dir, state, cfg.checkpoint.keep_last, sharded)
                if env.is_main:
                    bar.write(f"checkpoint: {saved}")
            window_started = time.perf_counter()  # checkpoints are not training time
        if (env.is_main or fsdp) and val_prompts and step % cfg.validation.every_n_steps == 0:
            with weights_as_exported(cfg, pipe, ema, run_dir, len(plan.instances), len(plan.classes)):
                save_validation_grid(cfg, pipe, run_dir, step, amp, val_prompts, val_sizes, write=env.is_main)
            window_started = time.perf_counter()
        if stop_now:
            break
    bar.close()
    stop.restore()
    if data.latent_cache_dir is not None:  # store is the LatentCache
        log(env, f"{store.summary()} (rank 0)")
    if metrics is not None:
        metrics.close()

    if diverged_at is not None:
        log(env, f"stopping: {tcfg.max_nonfinite_steps} consecutive non-finite losses at step {diverged_at}; the last good checkpoint is kept "
            "— lower train.lr or use train.mixed_precision=bf16, then resume")
        return 1
    if state.step < tcfg.max_steps:  # stopped by a signal
        log(env, f"stopped at step {state.step}; to continue: {resume_hint}")
        return 0
    if fsdp:
        export = export_sharded(cfg, env, pipe, trained, ema, run_dir)
    elif env.is_main:
        export = export_model(cfg, pipe, ema, run_dir, len(plan.instances), len(plan.classes))
    if env.is_main:
        weights = f"--weights {cfg.model.weights} --lora {export}" if cfg.lora.rank and cfg.model.weights else f"--weights {run_dir / 'model.safetensors'}"
        log(env, f"done: {tcfg.max_steps} steps. Fine-tuned {'LoRA' if cfg.lora.rank else 'model'}: {export}\n"
            f"  metrics: {metrics.path}\n  samples: {run_dir / 'samples'}\n"
            f"  try it:  python sample.py {weights} --prompt {subjects[0].instance_prompt!r}")
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
