"""YAML files and `section.key=value` overrides -> frozen config dataclasses, and back.

Every value is type-checked against its dataclass field (a name against the choices of its
`Literal`, config.py); an unknown key is an error that names the closest valid key, so a typo
never silently trains with a default. Then `check_values` checks ranges, and every check that
needs nothing but the config (combinations, FSDP's limits) runs here, before anything loads.
"""

import dataclasses
import os
import typing
from collections.abc import Callable
from pathlib import Path

import yaml

from minidream.config import (
    PIXELS_PER_LATENT,
    ConfigError,
    TrainConfig,
    coerce,
    from_dict,
    suggestion,
    takes_text,
    to_dict,
)
from minidream.diffusion.samplers import check_sampler_options
from minidream.files import atomic_file
from minidream.training.subjects import subjects_of

# (key, lowest, highest, whether the ends are allowed): numbers outside them are refused by name.
RANGES = (
    ("validation.guidance_rescale", 0, 1, True),
    ("train.noise_offset", 0, float("inf"), True),
    ("train.input_perturbation", 0, float("inf"), True),
    ("train.huber_c", 0, float("inf"), False),
    ("train.snr_gamma", 0, float("inf"), False),  # when set
    ("train.ema_decay", 0, 1, False),  # when set
    ("train.min_timestep", 0, float("inf"), True),
    ("lora.rank", 0, float("inf"), True),
    ("lora.text_encoder_rank", 0, float("inf"), True),
    ("lora.dropout", 0, 1, True),
    ("eval.every_n_steps", 0, float("inf"), True),  # 0 = off
    ("data.caption_dropout", 0, 1, True),
    ("data.max_aspect", 1, float("inf"), True),
    ("train.collective_timeout_s", 0, float("inf"), False),
    ("train.prodigy_d_coef", 0, float("inf"), False),
    ("train.lion_beta1", 0, 1, True),
    ("train.lion_beta2", 0, 1, True),
    ("train.adafactor_beta2_decay", -1, 0, True),
    ("train.adafactor_d", 0, float("inf"), False),
)
EXAMPLE_SUBJECT_DIR = "example-subject"  # inside run.output_dir: never a folder the user named
# Counts and intervals: zero or less would divide by zero or train nothing.
POSITIVE = (
    "model.clip_skip", "train.max_steps", "train.batch_size", "train.gradient_accumulation_steps",
    "train.max_nonfinite_steps", "train.ema_every", "checkpoint.every_n_steps", "checkpoint.keep_last",
    "run.log_every_n_steps", "validation.every_n_steps", "eval.num_prompts", "eval.images_per_prompt", "eval.steps",
    "data.bucket_step",
)


def say_on_main_rank(message: str) -> None:
    """Print a line for the user once per job: in the process torchrun numbers 0, or alone."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def load_train_config(
    path: str | Path | None, overrides: list[str], say: Callable[[str], None] = say_on_main_rank
) -> TrainConfig:
    """Read a YAML preset (or start from the defaults), then apply `a.b=c` overrides in order.

    `say` gets the one-line notes about the result (example_prompts_note), printed by default."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    config = from_dict(TrainConfig, data, where=str(path or "config"))
    for override in overrides:
        config = apply_override(config, override)
    check_values(config)
    config = with_instance_dir(config)
    for note in (example_prompts_note(data, overrides, config), prodigy_lr_note(config)):
        if note is not None:
            say(note)
    return config


def prodigy_lr_note(config: TrainConfig) -> str | None:
    """Prodigy estimates the step size itself and train.lr multiplies it: an AdamW-sized lr all but
    stops training. kohya warns below 0.1 as well (train_util.get_optimizer)."""
    train = config.train
    if train.optimizer == "prodigy" and train.lr < 0.1:
        return (f"note: train.optimizer=prodigy with train.lr={train.lr}: Prodigy estimates its own step size and "
                "train.lr multiplies it; use train.lr=1.0 and tune train.prodigy_d_coef")
    return None


def example_prompts_note(preset: dict, overrides: list[str], config: TrainConfig) -> str | None:
    """One line when the user's photos (a `data.instance_dir=` override) train with the prompts and
    prior of a preset's drawn example subject: `python train.py data.instance_dir=photos/my-dog`
    alone trains the dog as "a photo of sks toy" against toy class images. (A note rather than a
    refusal: tests and scripts train the tiny preset on other images on purpose.) None otherwise."""
    named = {override.partition("=")[0].strip() for override in overrides}
    preset_data = preset.get("data") if isinstance(preset.get("data"), dict) else {}
    data = config.data
    if not preset_data.get("example_subject") or "data.instance_dir" not in named or data.example_subject or data.subjects:
        return None
    kept = ["instance_prompt"] + (["class_dir", "class_prompt"] if data.class_dir is not None else [])
    left = [f"data.{key}" for key in kept if f"data.{key}" not in named]
    if not left:
        return None
    prior = f"with prior data.class_dir={data.class_dir} ({data.class_prompt!r})" if data.class_dir else "without a prior"
    fix = " and ".join(left) + (" (or data.class_dir=null for no prior)" if "data.class_dir" in left else "")
    return (f"note: data.instance_dir={data.instance_dir} is trained as {data.instance_prompt!r} {prior}: "
            f"{', '.join(left)} {'is' if len(left) == 1 else 'are'} the example subject's; set {fix} to describe yours")


def with_instance_dir(config: TrainConfig) -> TrainConfig:
    """Decide where the subject's images come from, once, so config.yaml records it.

    Photos the user names (`data.instance_dir`) always win: the drawn example subject is then
    off, so it is never written into, or mixed with, the user's folder. Without them the
    example subject (the embedded default) is drawn into its own folder in the run directory.
    """
    data = config.data
    own_folder = str(Path(config.run.output_dir) / EXAMPLE_SUBJECT_DIR)
    if data.example_subject and data.instance_dir in ("", own_folder):  # own_folder: a config.yaml read back
        return dataclasses.replace(config, data=dataclasses.replace(data, instance_dir=own_folder))
    if data.instance_dir:
        return dataclasses.replace(config, data=dataclasses.replace(data, example_subject=False))
    return config  # neither: the data check names the missing folder before any model loads


def check_values(config: TrainConfig) -> None:
    """Values the types allow but training cannot use: numbers out of range, counts below 1."""
    def value(dotted: str):
        section, key = dotted.split(".")
        return getattr(getattr(config, section), key)

    for dotted, low, high, closed in RANGES:
        number = value(dotted)
        inside = number is None or (low <= number <= high if closed else low < number < high)
        if not inside:
            bounds = f"[{low}, {high}]" if closed else f"({low}, {high})"
            raise ConfigError(f"{dotted} must be in {bounds.replace('inf', '∞')}, got {number}")
    for dotted in POSITIVE:
        if value(dotted) < 1:
            raise ConfigError(f"{dotted} must be at least 1, got {value(dotted)}")
    check_combinations(config)


def check_combinations(config: TrainConfig) -> None:
    """Settings that are each fine but cannot work together, refused before anything loads."""
    train, lora = config.train, config.lora
    if train.max_timestep is not None and train.max_timestep <= train.min_timestep:
        raise ConfigError(f"train.max_timestep={train.max_timestep} must be above train.min_timestep={train.min_timestep}")
    if train.fused_backward:
        # The optimizer steps each weight inside backward: no moment has every gradient at once.
        if train.gradient_accumulation_steps > 1:
            raise ConfigError("train.fused_backward steps inside backward, so it cannot accumulate: set train.gradient_accumulation_steps=1")
        if train.max_grad_norm is not None:
            raise ConfigError("train.fused_backward cannot clip by the global gradient norm (no moment has all gradients): set train.max_grad_norm=null")
        if train.mixed_precision == "fp16":
            raise ConfigError("train.fused_backward cannot unscale fp16 gradients per step: use train.mixed_precision=bf16")
    if lora.rank and train.train_text_encoder:
        raise ConfigError("with lora.rank > 0 the text encoder trains through its own adapters: set lora.text_encoder_rank "
                          "instead of train.train_text_encoder")
    if config.eval.every_n_steps and not (config.eval.clip and config.eval.dino):
        raise ConfigError("eval.every_n_steps needs the evaluation models: set eval.clip and eval.dino (see the README, Evaluate a run)")
    if config.run.export_ema == "both" and lora.rank:
        raise ConfigError("run.export_ema=both writes the UNet's EMA as model_ema.* beside a full model; "
                          "with LoRA choose ema or raw")
    if lora.text_encoder_rank and not lora.rank:
        raise ConfigError("lora.text_encoder_rank needs UNet adapters too: set lora.rank")
    if config.eval.every_n_steps and config.eval.prompts and config.data.subjects:
        raise ConfigError("eval.prompts with data.subjects: each subject is evaluated on the paper's prompts for its "
                          "class_noun with its identifier; leave eval.prompts empty (eval.num_prompts sets how many)")
    try:  # the validation sampler's options, refused now rather than at the first grid
        check_sampler_options(config.validation.sampler, karras=config.validation.karras)
    except ValueError as error:
        raise ConfigError(f"validation.karras: {error}") from None
    if config.data.bucket_step % PIXELS_PER_LATENT:
        raise ConfigError(f"data.bucket_step={config.data.bucket_step} must be a multiple of {PIXELS_PER_LATENT} (the VAE's downsampling)")
    check_optimizer(config)
    if train.sharding == "fsdp" and not lora.rank:  # LoRA adapters are replicated under fsdp (training/sharding.py)
        check_fsdp(config)
    subjects_of(config)  # data.subjects: each entry complete, none a twin of another


def check_fsdp(config: TrainConfig) -> None:
    """Options that cannot run with FSDP-sharded weights."""
    train = config.train
    if train.compile:
        raise ConfigError("train.compile with train.sharding=fsdp is not supported: the UNet compiles with fullgraph=True, and "
                          "FSDP2's per-block all-gather hooks break the graph; set train.compile=false or train.sharding=ddp")
    if train.mixed_precision == "fp16":
        raise ConfigError("train.sharding=fsdp with train.mixed_precision=fp16: the loss scaler would check only this rank's "
                          "gradient shards for overflow; use train.mixed_precision=bf16 (or no)")
    if train.optimizer != "adamw":
        raise ConfigError(f"train.optimizer={train.optimizer} cannot step sharded weights; use train.optimizer=adamw with train.sharding=fsdp")
    if config.eval.every_n_steps:
        raise ConfigError("eval.every_n_steps with train.sharding=fsdp: the ranks split the prompts, but every sharded forward "
                          "needs all ranks; evaluate the exported model with python -m minidream.evaluate instead")


# Why each optimizer beyond AdamW is refused with train.sharding=fsdp (docs/training.md, Optimizers).
NOT_SHARDED = {
    "prodigy": "its step size d sums over every weight of every rank (the library's fsdp_in_use all-reduce is not wired)",
    "adafactor": "its factored statistics and update clipping span whole tensors, which a shard holds only part of",
    "lion": "its state is not written to sharded (DCP) checkpoints yet",
    "adamw-schedulefree": "its evaluation-weight swap and state are not written to sharded (DCP) checkpoints yet",
}


def check_optimizer(config: TrainConfig) -> None:
    """The combinations train.optimizer cannot run with."""
    train, lora = config.train, config.lora
    if train.optimizer in NOT_SHARDED and train.sharding == "fsdp":
        raise ConfigError(f"train.optimizer={train.optimizer} with train.sharding=fsdp: {NOT_SHARDED[train.optimizer]}; use train.sharding=ddp")
    if train.optimizer != "prodigy":
        return
    if train.fused_backward:
        raise ConfigError("train.optimizer=prodigy estimates one step size from all gradients before it updates any weight, "
                          "so it cannot step inside backward: set train.fused_backward=false")
    text_encoder_trains = train.train_text_encoder or lora.text_encoder_rank > 0
    if text_encoder_trains and train.text_encoder_lr not in (None, train.lr):
        raise ConfigError("train.optimizer=prodigy adapts one step size for every weight (its groups' lr must be equal): "
                          "leave train.text_encoder_lr unset")


def apply_override(config, override: str):
    """Return `config` with one `section.key=value` override applied (value parsed as YAML)."""
    dotted, sep, raw = override.partition("=")
    if not sep or not dotted:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    return _replace_path(config, dotted.split("."), raw, dotted)


def save_config(config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _replace_path(config, keys: list[str], raw: str, dotted: str):
    fields = {f.name for f in dataclasses.fields(config)}
    key = keys[0]
    if key not in fields:
        raise ConfigError(f"override {dotted!r}: unknown key {key!r}{suggestion(key, fields)}")
    current = getattr(config, key)
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        return dataclasses.replace(config, **{key: _replace_path(current, keys[1:], raw, dotted)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"override {dotted!r}: {key!r} is a section; set one of its keys, e.g. {key}.<key>=...")
    hint = typing.get_type_hints(type(config))[key]
    value = yaml.safe_load(raw) if raw.strip() else None
    if takes_text(hint) and not isinstance(value, str) and value is not None:
        value = raw  # a prompt like "1984" stays the text the user typed
    return dataclasses.replace(config, **{key: coerce(value, hint, f"override {dotted}")})
