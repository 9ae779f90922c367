"""DreamBooth fine-tuning of Stable Diffusion 1.x, 2.x and XL (Ruiz et al. 2023), hand-written.

    python train.py                                   # the embedded default: a tiny model on the CPU
    python train.py --config configs/dreambooth-sd15.yaml model.weights=... data.instance_dir=...
    torchrun --nproc_per_node=8 train.py --config ...  # the same on 8 GPUs

The loop is in `train()` below, top to bottom. Its pieces each have a home in minidream.training:
where a sample comes from (dataset.py), why resume is exact (order.py), when and how a checkpoint
is written (checkpointer.py), what happens at the optimizer step (step.py), the loss (recipe.py).
This file keeps what needs the models and files: loading, the trainable set, validation grids,
export and evaluation during training.
"""

import argparse
import contextlib
import dataclasses
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minidream.config import ARCHITECTURES, ConfigError, ScheduleConfig, TrainConfig, to_dict
from minidream.diffusion import schedule
from minidream.diffusion.sampling import clip_skip_limit, generate, image_grid, unet_conditioning
from minidream.dreambooth_prompts import subject_prompts
from minidream.evaluate import Sampling, Scores, embed_images, evaluate, load_eval_models, read_prompt_templates, subject_images
from minidream.files import WriteError, atomic_file
from minidream.io.lora_files import kohya_settings, lora_merged, read_lora_file, save_lora
from minidream.io.weights import WeightsError, load_pipeline, save_pipeline
from minidream.models.lora import add_lora, train_adapters_only
from minidream.models.pipeline import Pipeline, random_pipeline
from minidream.models.precision import dtype_named, vae_dtype
from minidream.training import sharding
from minidream.training.batches import PromptEncoder
from minidream.training.checkpoint import CheckpointError, TrainerState
from minidream.training.checkpointer import Checkpointer, run_setup
from minidream.training.config_file import load_train_config, save_config
from minidream.training.data import DataError
from minidream.training.dataset import DreamBoothData
from minidream.training.distributed import (
    Distributed,
    Heartbeat,
    any_rank,
    barrier,
    gather_objects,
    init_distributed,
    log,
    shutdown,
    timed_out,
)
from minidream.training.ema import EMA
from minidream.training.metrics import MetricsLog, PendingSteps
from minidream.training.optimizers import OptimizerError, build_optimizer, optimizer_class
from minidream.training.recipe import Recipe, draw_noise, noisy_latents_and_target, recipe_loss
from minidream.training.schedule_free import evaluation_weights, restore_training_weights
from minidream.training.signals import StopRequest
from minidream.training.step import lr_factor, optimizer_step
from minidream.training.subjects import Subject
from minidream.training.wandb_log import wandb_log

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DreamBooth fine-tuning of Stable Diffusion 1.x, 2.x and XL. Without --config, runs the embedded "
        "default (configs/tiny.yaml: a tiny model on a drawn example subject, seconds on a CPU).",
        epilog="Overrides are section.key=value, e.g. train.max_steps=400 data.instance_dir=photos/dog "
        "run.resume=latest. --show-config prints every key with its value.",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML preset (default: %(default)s)")
    parser.add_argument("--show-config", action="store_true", help="print the resolved config (every key) and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied in order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 trained and exported; 1 stopped by non-finite losses or weights; 2 bad input
    (config, data, weights, checkpoint); 3 a rank stopped answering; 128 + N stopped by signal N
    after saving a checkpoint (143: SIGTERM, 130: SIGINT)."""
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = one_line_warning
    args = parse_args(argv)
    try:
        if args.show_config:  # notes about the config go to stderr: stdout is the YAML alone
            cfg = load_train_config(args.config, args.overrides, say=lambda note: print(note, file=sys.stderr))
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        cfg = load_train_config(args.config, args.overrides)
        env = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    except (ConfigError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    heartbeat = Heartbeat(env, cfg.train.collective_timeout_s) if env.world_size > 1 else None
    where = f" (rank {env.rank})" if env.world_size > 1 else ""
    try:
        return train(cfg, env, resume_command(argv, env))
    except (ConfigError, DataError, WeightsError, CheckpointError, OptimizerError, WriteError) as error:
        print(f"error{where}: {error}", file=sys.stderr)  # WriteError: an export, a grid or a class image (disk full, permissions)
        return 2
    except RuntimeError as error:  # gloo raises a plain RuntimeError when a collective times out
        if heartbeat is None or not timed_out(error):
            raise
        print(f"error{where}: {heartbeat.explain(cfg.train.collective_timeout_s)}", file=sys.stderr)
        return 3
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        shutdown()


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the user reads them: one line, without Python's file and source decoration."""
    return f"warning: {message}\n"


def resume_command(argv: list[str], env: Distributed) -> str:
    """The command that continues this run: the same arguments, with run.resume=latest."""
    launcher = "python train.py" if env.world_size == 1 else "torchrun <same options> train.py"
    return " ".join([launcher, *(shlex.quote(a) for a in argv if not a.startswith("run.resume=")), "run.resume=latest"])


def load_models(cfg: TrainConfig, env: Distributed) -> Pipeline:
    if cfg.model.weights:
        return load_pipeline(cfg.model.weights, device=env.device, dtype=torch.float32, use_ema=cfg.model.use_ema)
    log(env, f"model.weights is not set: starting from random {cfg.model.architecture} weights (seed {cfg.train.seed})")
    return random_pipeline(ARCHITECTURES[cfg.model.architecture], seed=cfg.train.seed).to(env.device)


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
                sampler=val.sampler, karras=val.karras, guidance=val.guidance, guidance_rescale=val.guidance_rescale,
                clip_skip=cfg.model.clip_skip, height=height, width=width,
            )
        name = f"step-{step:08d}.png" if len(sizes) == 1 else f"step-{step:08d}-{width}x{height}.png"
        if write:
            with atomic_file(run_dir / "samples" / name) as tmp:
                image_grid(images, columns=min(4, len(images))).save(tmp, format="PNG")
    pipe.unet.train()


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
    encoders = pipe.text_encoders_by_name  # SDXL: both train, or neither
    if lora.rank:
        add_lora(pipe.unet, lora.targets, lora.rank, lora.alpha, lora.dropout, generator=lora.init_seed)
        groups = [{"params": train_adapters_only(pipe.unet, amp_dtype), "lr": tcfg.lr}]
        for i, (name, encoder) in enumerate(encoders.items() if lora.text_encoder_rank else ()):
            # kohya's text-encoder targets (attention and MLP), same alpha
            add_lora(encoder, "all", lora.text_encoder_rank, lora.alpha, lora.dropout, generator=lora.init_seed + 1 + i)
            groups.append({"params": train_adapters_only(encoder, amp_dtype), "lr": text_encoder_lr})
            trained[name] = encoder
    else:
        groups = [{"params": list(pipe.unet.parameters()), "lr": tcfg.lr}]
        for name, encoder in encoders.items() if tcfg.train_text_encoder else ():
            groups.append({"params": list(encoder.parameters()), "lr": text_encoder_lr})
            trained[name] = encoder
    for name, encoder in encoders.items():
        if name not in trained:
            encoder.requires_grad_(False).to(dtype=amp_dtype)
    pipe.unet.gradient_checkpointing = tcfg.gradient_checkpointing
    if tcfg.compile:  # in place: parameter names, DDP and checkpoints see the same module
        pipe.unet.compile(fullgraph=True)
    for module in trained.values():
        module.train()  # LoRA dropout acts in training mode only
    return trained, groups


def distribute(
    pipe: Pipeline, trained: dict[str, nn.Module], groups: list[dict], env: Distributed, amp_dtype: torch.dtype, fsdp: bool,
) -> tuple[nn.Module, list[nn.Module], list[nn.Module], list[dict]]:
    """The trained modules made to train together on all ranks: FSDP-sharded in place (`fsdp`), or
    each wrapped in DDP (2+ ranks). Returns the UNet and text encoders as the loop calls them, the
    modules whose gradients are reduced across ranks, and the optimizer's groups (over the shards)."""
    if fsdp:  # in place: the modules become FSDP modules of DTensor parameters
        groups = sharding.shard(trained, groups, amp_dtype, env.device, env.world_size)

    def wrap(name, module):
        if env.world_size == 1 or fsdp:
            return module
        # A text encoder's last layers can be trained yet never reach the conditioning (SDXL's CLIP-L
        # and model.clip_skip > 1 condition on an earlier layer): DDP must not wait for their gradients.
        return DistributedDataParallel(module, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                       find_unused_parameters=name != "unet")

    wrapped = {name: wrap(name, module) for name, module in trained.items()}
    text_encoders = [wrapped.get(name, encoder) for name, encoder in pipe.text_encoders_by_name.items()]
    return wrapped["unet"], text_encoders, list(wrapped.values()) if env.world_size > 1 else [], groups


@contextlib.contextmanager
def weights_as_exported(cfg: TrainConfig, pipe: Pipeline, ema: EMA | None, run_dir: Path, kohya: dict[str, str]):
    """`pipe` holding the weights the run exports, for the block: the EMA's (run.export_ema=ema)
    and, with LoRA, the adapters written to lora.safetensors (with the `kohya` settings) and merged
    back into the base the way the UIs merge them, so a validation grid shows what ComfyUI or
    A1111 will. Yields the LoRA file (None without LoRA); afterwards every weight is as it was."""
    with exported_ema(cfg, ema):
        if not cfg.lora.rank:
            yield None
            return
        path = run_dir / "lora.safetensors"
        adapted = pipe.text_encoders_by_name if cfg.lora.text_encoder_rank else {}
        save_lora(path, pipe.unet, adapted.get("text_encoder"), text_encoder_2=adapted.get("text_encoder_2"), settings=kohya,
                  schedule=pipe.config.schedule)
        with lora_merged(pipe, read_lora_file(path, pipe.config)):
            yield path


def export(cfg: TrainConfig, env: Distributed, pipe: Pipeline, trained: dict[str, nn.Module], ema: EMA | None,
           run_dir: Path, kohya: dict[str, str], fsdp: bool) -> Path:
    """Write the run's result (all ranks call): model.safetensors (SD single file), or with LoRA
    lora.safetensors, plus the merged model when run.export_merged is set or the base is not a file
    (random weights). `fsdp`: the weights run.export_ema picks are gathered one tensor at a time to
    the main rank, which writes them from unsharded twins."""
    path, dtype = run_dir / "model.safetensors", dtype_named(cfg.run.export_dtype)
    if fsdp:
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
        if env.is_main:
            exported = dataclasses.replace(pipe, **{name: twins.get(name, module) for name, module in
                                                    {"unet": pipe.unet, **pipe.text_encoders_by_name}.items()})
            save_pipeline(exported, path, dtype=dtype, unet_ema=unet_ema)
        return path
    if not env.is_main:
        return path
    with weights_as_exported(cfg, pipe, ema, run_dir, kohya) as lora_file:
        if lora_file is None or cfg.run.export_merged or not cfg.model.weights:
            # export_ema=both: the raw weights as the model, the UNet's EMA beside them (LDM has no text-encoder EMA).
            unet_ema = None
            if ema is not None and cfg.run.export_ema == "both":
                unet_ema = {name.removeprefix("unet."): t for name, t in ema.state_dict()["shadow"].items() if name.startswith("unet.")}
            save_pipeline(pipe, path, dtype=dtype, unet_ema=unet_ema)
    return lora_file or path


def nonfinite_weights(trained: dict[str, nn.Module], ema: EMA | None) -> str | None:
    """The name of a trained weight (or EMA weight) holding NaN or inf on any rank, else None: such
    weights are never exported. Frozen weights are not checked (training cannot change them). One
    reduction and one host read, at the end of the run. (Sharded: each rank checks its shards.)"""
    named = [(f"{name}.{key}", p) for name, module in trained.items() for key, p in module.named_parameters() if p.requires_grad]
    if ema is not None:
        named += [(f"ema {name}", s) for name, s in zip(ema.names, ema.shadow)]
    finite = torch.stack([torch.isfinite(sharding.local(p.detach())).all() for _, p in named])
    bad = None if finite.all() else named[int((~finite).nonzero()[0])][0]
    return next((name for name in gather_objects(bad) if name), None)


def done_message(cfg: TrainConfig, run_dir: Path, exported: Path, prompt: str, gridded: bool) -> str:
    """What the run wrote, and one sample.py command to try it at the size it trained at."""
    lines = [f"done: {cfg.train.max_steps} steps. Fine-tuned {'LoRA' if cfg.lora.rank else 'model'}: {exported}",
             f"  metrics: {run_dir / 'metrics.jsonl'}"]
    if gridded:
        lines.append(f"  samples: {run_dir / 'samples'}")
    weights = f"--weights {cfg.model.weights} --lora {exported}" if cfg.lora.rank and cfg.model.weights else f"--weights {run_dir / 'model.safetensors'}"
    size = cfg.data.resolution
    try_it = f"  try it:  python sample.py {weights} --prompt {prompt!r} --height {size} --width {size}"
    if not cfg.model.weights:  # the embedded default: seconds, and what to expect of it
        try_it += " --steps 10   (random weights: expect noise; set model.weights for a real model)"
    return "\n".join([*lines, try_it])


def check_eval_models(cfg: TrainConfig) -> None:
    for flag in ("clip", "dino") if cfg.eval.every_n_steps else ():
        if not Path(getattr(cfg.eval, flag)).exists():
            raise ConfigError(f"eval.{flag}={getattr(cfg.eval, flag)}: no such file or folder (see docs/evaluate.md)")


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


def train(cfg: TrainConfig, env: Distributed, resume_hint: str) -> int:
    tcfg = cfg.train
    amp_dtype = dtype_named(tcfg.mixed_precision)

    def amp():
        return torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)

    # 1. Before any model loads: the run folder and its checkpoints, then every data problem.
    if tcfg.fused_backward and env.world_size > 1:
        raise ConfigError("train.fused_backward steps each weight before DDP has averaged its gradient: run it in one process")
    dcp = sharding.uses_fsdp(cfg)  # checkpoints written with DCP, even on one process
    fsdp = dcp and env.world_size > 1  # the trained weights really are sharded
    checkpointer = Checkpointer(Path(cfg.run.output_dir), cfg, env, dcp=dcp, sharded=fsdp)
    run_dir = checkpointer.run_dir
    data = DreamBoothData.scan(cfg, env)
    check_eval_models(cfg)
    optimizer_class(tcfg.optimizer)  # a missing optional package is named now

    # 2. Models: what trains (the UNet, or its LoRA adapters; optionally the text encoder) keeps
    #    fp32 master weights; the frozen parts run in the AMP dtype.
    pipe = load_models(cfg, env)
    if cfg.model.clip_skip > clip_skip_limit(pipe.config):
        raise ConfigError(f"model.clip_skip={cfg.model.clip_skip}, but this model's text encoders count back at most {clip_skip_limit(pipe.config)} layers")
    data.prepare(pipe, amp)
    sched = training_schedule(cfg, pipe)
    trained, groups = prepare_models(cfg, pipe, amp_dtype)
    unet, text_encoders, synced_modules, groups = distribute(pipe, trained, groups, env, amp_dtype, fsdp)
    encode_prompts = PromptEncoder(pipe.tokenizers, text_encoders, "text_encoder" in trained, cfg.model.clip_skip)
    alphas_cumprod = schedule.alphas_cumprod_of(sched).to(env.device)
    recipe = Recipe.from_config(tcfg, sched)
    val_prompts = validation_prompts(cfg, data.subjects)
    kohya = kohya_settings(cfg, len(data.plan.instances), len(data.plan.classes), [s.instance_prompt for s in data.subjects])

    # 3. Optimizer, LR schedule, loss scaler, EMA; the trainer state, saved and restored whole.
    optimizer, lr_schedule = build_optimizer(groups, tcfg)
    scaler = torch.amp.GradScaler(env.device.type, enabled=tcfg.mixed_precision == "fp16")
    named = [(f"{name}.{key}", p) for name, module in trained.items() for key, p in module.named_parameters() if p.requires_grad]
    ema_class = sharding.ShardedEMA if fsdp else EMA  # sharded: the EMA of the local shards
    ema = ema_class(named, tcfg.ema_decay, tcfg.ema_warmup) if tcfg.ema_decay is not None else None
    state = TrainerState(
        modules=trained, optimizer=optimizer, lr_schedule=lr_schedule, scaler=scaler,
        setup=run_setup(cfg, pipe.config.unet, list(trained)), adapters_only=cfg.lora.rank > 0, ema=ema,
    )
    resumed_from = checkpointer.load(state)
    if resumed_from is not None:
        restore_training_weights(optimizer)  # schedule-free: its checkpoints hold the evaluation weights
        log(env, f"resumed from {resumed_from} at step {state.step}")
    metrics = MetricsLog(run_dir, cfg.run.tensorboard, wandb_log(cfg, run_dir)) if env.is_main else None
    subject_names = data.plan.subjects if cfg.data.subjects else ()
    if env.is_main:  # only now: a refused resume leaves the run directory as it was
        save_config(cfg, run_dir / "config.yaml")
        metrics.truncate_after(state.step)
    diverged_at = None

    # 4. The loop: accumulate micro-batches, clip, step; every run.log_every_n_steps steps read the
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
            batch, state.cursor = data.next(state.cursor)
            noise, input_noise, t = draw_noise(batch.latents.shape[1:], batch.generators, recipe, env.device)
            noisy, target = noisy_latents_and_target(batch.latents, noise, input_noise, t, alphas_cumprod, recipe)
            # Gradients are reduced across ranks only on the last micro-step of the accumulation.
            with sharding.gradient_sync(synced_modules, micro == accum - 1):
                with amp():
                    conditioning = encode_prompts(batch.prompts, env.device)  # SDXL: y from each sample's size ids
                    prediction = unet(noisy, t, *unet_conditioning(conditioning, batch.size_ids, pipe.config.unet.size_embed_dim))
                losses = recipe_loss(prediction, target, t, alphas_cumprod, recipe, batch.num_instance, tcfg.prior_loss_weight, batch.masks)
                scaler.scale(losses.total / accum).backward()
            totals += torch.stack([losses.total.detach(), losses.instance.detach(), losses.prior.detach()]) / accum
            if subject_names:  # each subject's instance samples, summed through the one-hot matrix: no host read
                subject_totals += torch.stack([losses.per_sample @ batch.subjects, batch.subjects.sum(0)])
            window_samples += len(batch.prompts) * env.world_size
        grad_norm, skip = optimizer_step(optimizer, scaler, tcfg.max_grad_norm, fsdp)
        if ema is not None and (state.step + 1) % tcfg.ema_every == 0:
            ema.update(skip)  # on the device: a skipped step leaves the EMA as it was
        pending.add(state.step + 1, optimizer.param_groups[0]["lr"], totals, grad_norm, skip, subject_totals)
        if lr_schedule is not None:
            lr_schedule.step()
        state.step += 1
        bar.update(1)

        stop_now, step = False, state.step
        evaluating = cfg.eval.every_n_steps > 0 and step % cfg.eval.every_n_steps == 0
        if step % cfg.run.log_every_n_steps == 0 or checkpointer.due(step, tcfg.max_steps) or evaluating:
            records = pending.read()  # the host waits for the GPU here, and only here
            samples_per_s, window_samples = window_samples / (time.perf_counter() - window_started), 0
            if evaluating:  # the scores join the step's record (and TensorBoard)
                with evaluation_weights(optimizer):
                    records[-1].update(evaluate_subjects(cfg, env, pipe, ema, amp, amp_dtype, data.subjects))
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
            if stop_now or checkpointer.due(step, tcfg.max_steps):
                try:
                    with evaluation_weights(optimizer):
                        saved = checkpointer.save(state)
                except CheckpointError as error:  # the previous checkpoint is intact: say how to continue from it
                    raise CheckpointError(f"{error}; to continue: {resume_hint}") from None
                if env.is_main:
                    bar.write(f"checkpoint: {saved}")
            window_started = time.perf_counter()  # checkpoints are not training time
        if (env.is_main or fsdp) and val_prompts and (step % cfg.validation.every_n_steps == 0 or step == tcfg.max_steps):
            with evaluation_weights(optimizer), weights_as_exported(cfg, pipe, ema, run_dir, kohya):
                save_validation_grid(cfg, pipe, run_dir, step, amp, val_prompts, data.sizes, write=env.is_main)
            window_started = time.perf_counter()
        if stop_now:
            break
    bar.close()
    stop.restore()
    if cfg.data.latent_cache_dir is not None:  # the store is the LatentCache
        log(env, f"{data.store.summary()} (rank 0)")
    if metrics is not None:
        metrics.close()

    if diverged_at is not None:
        log(env, f"stopping: {tcfg.max_nonfinite_steps} consecutive non-finite losses at step {diverged_at}; the last good checkpoint is kept "
            "— lower train.lr or use train.mixed_precision=bf16, then resume")
        return 1
    if state.step < tcfg.max_steps:  # stopped by a signal
        log(env, f"stopped at step {state.step}; to continue: {resume_hint}")
        return stop.exit_code
    broken = nonfinite_weights(trained, ema)
    if broken:
        log(env, f"not exporting: {broken} holds non-finite values (the run diverged, or resumed from a damaged "
            "checkpoint); resume from an earlier checkpoint with a lower train.lr")
        return 1
    with evaluation_weights(optimizer):
        exported = export(cfg, env, pipe, trained, ema, run_dir, kohya, fsdp)
    log(env, done_message(cfg, run_dir, exported, data.subjects[0].instance_prompt, bool(val_prompts)))
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
