"""Frozen configuration dataclasses for every component.

The defaults are Stable Diffusion 1.5; `TINY` is a small model of the same architecture that
runs in seconds on a CPU. Nothing here imports torch, so configs load before any model does.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

# The names users choose from, in one place. Each is the type of the config fields that take it
# (`coerce` refuses any other value by name), and a tuple of the same names for CLIs and for the
# code that acts on them.
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
Sampler = Literal["ddim", "ddpm", "euler-a", "dpmpp-2m", "euler", "heun", "plms", "lms", "dpmpp-2m-sde", "unipc"]
Precision = Literal["fp32", "fp16", "bf16"]  # torch dtypes by name: minidream.models.precision.DTYPES
MixedPrecision = Literal["no", "fp16", "bf16"]  # "no" = fp32 weights and no autocast
FilePrecision = Literal["fp16", "fp32"]  # what SD files are released in
Architecture = Literal["sd15", "tiny", "sd21", "sd21-base", "tiny-sd2", "sdxl", "tiny-sdxl"]  # the keys of ARCHITECTURES
LRSchedule = Literal["constant", "linear", "cosine"]
Device = Literal["auto", "cpu", "cuda"]
ExportEMA = Literal["ema", "raw", "both"]
Loss = Literal["mse", "huber", "smooth_l1"]  # computed in diffusion/loss_weighting.py
HuberSchedule = Literal["constant", "exponential", "snr"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "lion", "adamw-schedulefree", "adafactor"]  # built in training/optimizers.py
Sharding = Literal["ddp", "fsdp"]
LoRATargets = Literal["attention", "transformer", "all"]  # UNet layers adapted, models/lora.py

PREDICTION_TYPES = typing.get_args(PredictionType)
TIMESTEP_SPACINGS = typing.get_args(TimestepSpacing)
SAMPLERS = typing.get_args(Sampler)
PRECISIONS = typing.get_args(Precision)
FILE_PRECISIONS = typing.get_args(FilePrecision)
LR_SCHEDULES = typing.get_args(LRSchedule)
DEVICES = typing.get_args(Device)
LOSSES = typing.get_args(Loss)
HUBER_SCHEDULES = typing.get_args(HuberSchedule)
OPTIMIZERS = typing.get_args(Optimizer)
UNET_TARGETS = typing.get_args(LoRATargets)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (SD 1.x: OpenAI CLIP ViT-L/14's text tower)."""

    vocab_size: int = 49408
    context_length: int = 77  # number of positions; prompts are padded/truncated to this
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # OpenCLIP encoders (SD 2.x) use "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # the pooled output is taken at the first EOS token
    clip_skip: int = 1  # 1 = last layer; 2 = penultimate layer (+ final norm), as UIs do
    # SD 2.x single files: OpenCLIP's text tower under its own names (models/open_clip_text.py).
    # Then `layers` counts all its resblocks (24 in ViT-H/14), SD 2.x conditions on the
    # penultimate one, and clip_skip counts from there (1 = SD 2.x's layer, 2 = one earlier).
    open_clip: bool = False
    # SDXL (sgm's `legacy=False`): the conditioning layer's states go to the UNet without the
    # final layer norm; SD 1.x and 2.x apply it.
    final_norm: bool = True

    @property
    def conditioning_layers(self) -> int:
        """How many layers clip_skip can count back through: all of CLIP's; OpenCLIP's but the last,
        which SD 2.x never runs."""
        return self.layers - 1 if self.open_clip else self.layers


@dataclass(frozen=True)
class UNetConfig:
    """LDM UNet with cross-attention (SD 1.x; SD 2.x differs only in the knobs marked)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (by index into channel_mult) with cross-attention
    num_heads: int = 8  # SD 1.x: a fixed head count
    head_dim: int | None = None  # SD 2.x: a fixed head size (64); overrides num_heads when set
    # Transformer blocks per SpatialTransformer: one number for every level, or one per level
    # (SDXL: (1, 2, 10), the first unused: no attention there), the middle block taking the deepest level's.
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768  # SD 2.x: 1024
    use_linear_proj: bool = False  # SD 2.x: proj_in/proj_out are Linear instead of 1x1 Conv
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # SD 2.1: attention scores (q.k and softmax) in fp32 when q and k are half, as diffusers'
    # classic AttnProcessor does for upcast_attention=True; no effect in fp32.
    upcast_attention: bool = False
    # SDXL's vector conditioning y (sgm's `adm_in_channels`, 2816): the pooled text embedding and
    # the Fourier features of the six size-and-crop ids, through `label_emb` into the timestep
    # embedding. None: no y (SD 1.x and 2.x).
    adm_in_channels: int | None = None
    size_embed_dim: int = 256  # the Fourier features of each size-and-crop id (SDXL: 256)

    def depth(self, level: int | None) -> int:
        """Transformer blocks at `level` (None: the middle block)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[-1 if level is None else level]


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL with 8x spatial downsampling (PIXELS_PER_LATENT; every SD family)."""

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215  # applied outside the VAE: latents = scaling_factor * z


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule and inference timestep spacing (SD 1.x's scheduler config)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # "scaled_linear" | "linear" | "squaredcos_cap_v2"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    # "leading" | "trailing" | "linspace"; None: the config does not say (SD 1.x and 2.x releases and
    # single files), and each sampler takes its diffusers scheduler's default (samplers.default_spacing).
    timestep_spacing: str | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    rescale_betas_zero_snr: bool = False  # Lin et al. 2024: betas rescaled so alpha_bar at the last step is 0


@dataclass(frozen=True)
class ModelConfig:
    """All parts of a Stable Diffusion pipeline."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # SDXL's second text encoder (OpenCLIP ViT-bigG/14); its states follow the first's on the
    # channel axis, and its pooled projection feeds the UNet's y. None: one encoder (SD 1.x, 2.x).
    text_encoder_2: TextEncoderConfig | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


SD15 = ModelConfig()

# Same architecture, a few hundred thousand parameters per part: for CPU tests and the
# embedded default run. Channels stay multiples of norm_groups.
TINY = ModelConfig(
    text_encoder=TextEncoderConfig(width=32, layers=2, heads=4, mlp_width=64),
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_heads=2,
        context_dim=32,
        norm_groups=8,
    ),
    vae=VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
)


# Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1 and -2-1-base; 2.0 has the same shapes):
# OpenCLIP ViT-H/14's text tower as the single files hold it (24 resblocks, the penultimate
# read), 64-channel heads (diffusers' attention_head_dim [5, 10, 20, 20] = heads per level),
# a 1024-wide context, linear proj_in/proj_out. 768-v predicts v, the 512 base predicts noise;
# both use SD 1.5's betas and VAE. SD 2.1's unet/config.json sets upcast_attention: attention
# scores in fp32 when the UNet runs in fp16/bf16 (models/layers.py, attention_scores_fp32).
SD2_TEXT_ENCODER = TextEncoderConfig(width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", open_clip=True)
SD2_UNET = UNetConfig(head_dim=64, context_dim=1024, use_linear_proj=True, upcast_attention=True)
SD21_BASE = ModelConfig(text_encoder=SD2_TEXT_ENCODER, unet=SD2_UNET)
SD21 = dataclasses.replace(SD21_BASE, schedule=ScheduleConfig(prediction_type="v_prediction"))

# TINY's shapes in SD 2's layout. The text tower keeps 24 (narrow) resblocks, so that diffusers'
# SD 2 converters, which drop resblock 23 by name, read its files as they read SD 2.1's.
TINY_SD2 = ModelConfig(
    text_encoder=dataclasses.replace(TINY.text_encoder, layers=24, activation="gelu", open_clip=True),
    unet=dataclasses.replace(TINY.unet, head_dim=16, use_linear_proj=True, upcast_attention=True),
    vae=TINY.vae,
    schedule=ScheduleConfig(prediction_type="v_prediction"),
)

# Stable Diffusion XL base 1.0 (Podell et al. 2023; sgm's configs/inference/sd_xl_base.yaml):
# three levels, no attention at the first, 1/2/10 transformer blocks per level (10 in the
# middle), 64-wide heads, a 2048-wide context: CLIP ViT-L/14's penultimate states (768) beside
# OpenCLIP ViT-bigG/14's (1280), neither layer-normed. y = bigG's pooled projection (1280) and
# six 256-wide size-and-crop features (1536). Same VAE architecture, new weights, scale 0.13025.
# SDXL's scheduler_config.json: Euler, "leading" spacing, SD 1.5's betas.
SDXL = ModelConfig(
    text_encoder=TextEncoderConfig(clip_skip=2, final_norm=False),
    unet=UNetConfig(
        channel_mult=(1, 2, 4), attention_levels=(1, 2), head_dim=64, transformer_depth=(1, 2, 10),
        context_dim=2048, use_linear_proj=True, adm_in_channels=2816,
    ),
    vae=VAEConfig(scaling_factor=0.13025),
    schedule=ScheduleConfig(timestep_spacing="leading"),
    text_encoder_2=TextEncoderConfig(
        width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", open_clip=True, final_norm=False
    ),
)

# SDXL's layout at TINY's sizes (as diffusers' own SDXL test components): two 32-wide encoders,
# three levels with attention at the last two, 8-wide size features (y: 32 + 6 x 8 = 80).
TINY_SDXL = ModelConfig(
    text_encoder=dataclasses.replace(TINY.text_encoder, clip_skip=2, final_norm=False),
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2), head_dim=16,
        transformer_depth=(1, 1, 2), context_dim=64, use_linear_proj=True, norm_groups=8, adm_in_channels=80,
        size_embed_dim=8,
    ),
    vae=dataclasses.replace(TINY.vae, scaling_factor=0.13025),
    schedule=SDXL.schedule,
    text_encoder_2=dataclasses.replace(
        TINY.text_encoder, layers=3, activation="gelu", open_clip=True, final_norm=False
    ),
)


@dataclass(frozen=True)
class ModelSection:
    architecture: Architecture = "sd15"  # the shapes to build when no weights are given
    weights: str | None = None  # checkpoint file or folder; None = random init (tiny runs, tests)
    use_ema: bool = False  # take model_ema.* weights from single files that carry them
    clip_skip: int = 1  # text-encoder layer the UNet reads: 1 = last, 2 = penultimate (+ final norm), as UIs offer
    # Lin et al. 2024: rescale the betas so the last step is pure noise (alpha_bar_T = 0); needs a
    # v-prediction target (train.prediction_type), and the exported model samples with the same betas
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class SubjectEntry:
    """One entry of data.subjects (training/subjects.py); a key left out takes the data.* value of the same name."""

    instance_dir: str | None = None  # required
    instance_prompt: str | None = None  # required
    name: str | None = None  # its metrics key, loss/<name>; None = the instance folder's name
    class_dir: str | None = None  # subjects naming the same folder share its class images
    class_prompt: str | None = None
    num_class_images: int | None = None
    repeats: int = 1  # its instance images are listed this many times per epoch
    identifier: str | None = None  # {identifier} in data.caption_template, e.g. "sks"
    class_noun: str | None = None  # {class} in data.caption_template, e.g. "dog"


@dataclass(frozen=True)
class DataSection:
    instance_dir: str = ""  # your subject's photos; empty = the drawn example subject, if example_subject
    instance_prompt: str = "a photo of sks dog"
    example_subject: bool = False  # with no instance_dir: draw an example subject into run.output_dir/example-subject
    class_dir: str | None = None  # None = no prior preservation
    class_prompt: str = "a photo of dog"
    num_class_images: int = 200
    resolution: int = 512
    center_crop: bool = True  # False = random crop
    random_flip: bool = False
    skip_bad_images: bool = False  # True = warn and skip undecodable files instead of stopping
    class_sampler: Sampler = "ddim"
    class_steps: int = 50
    class_guidance: float = 7.5
    class_batch_size: int = 4
    # Real photo sets (README: Several subjects, buckets, masks); every option is off by default.
    subjects: tuple[SubjectEntry, ...] = ()  # several subjects in one run; empty = the single subject above
    caption_template: str | None = None  # e.g. "a photo of {identifier} {class}"; a photo.txt caption wins
    caption_dropout: float = 0.0  # probability that an instance prompt becomes "" (class prompts never)
    buckets: bool = False  # aspect-ratio buckets of about resolution^2 pixels instead of square crops
    bucket_step: int = 64  # bucket sides are multiples of this
    max_aspect: float = 2.0  # the widest bucket's width / height (and the tallest's height / width)
    masks: bool = False  # weight the loss by photo.mask.png beside photo.jpg (white = subject)
    latent_cache_dir: str | None = None  # VAE moments on disk, keyed by file content, VAE and transform


@dataclass(frozen=True)
class TrainSection:
    max_steps: int = 800
    batch_size: int = 1  # instance images per optimizer step per rank (class images double it)
    lr: float = 2e-6
    text_encoder_lr: float | None = None  # None = same as lr
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    mixed_precision: MixedPrecision = "no"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this; null = no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    seed: int = 0
    cache_latents: bool = True  # encode each image once when the transforms are deterministic
    compile: bool = False  # torch.compile the UNet (one graph, no breaks: fullgraph=True)
    device: Device = "auto"  # "auto": this rank's GPU if any, else the CPU
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite losses
    # The training recipe (diffusion/loss_weighting.py); every option is off by default.
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; None = off
    noise_offset: float = 0.0  # offset noise (Guttenberg 2023), e.g. 0.05; 0 = off
    input_perturbation: float = 0.0  # input perturbation (Ning et al. 2023), e.g. 0.1; 0 = off
    loss: Loss = "mse"  # "huber" is the pseudo-Huber loss
    huber_c: float = 0.1  # the Huber / smooth-L1 parameter c (at the most noisy step, when scheduled)
    huber_schedule: HuberSchedule = "snr"  # c over timesteps (kohya's scheduled pseudo-Huber)
    min_timestep: int = 0  # training timesteps are drawn uniformly from [min_timestep, max_timestep)
    max_timestep: int | None = None  # None = num_train_timesteps
    ema_decay: float | None = None  # keep an EMA of the trained weights, e.g. 0.9999; None = off
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    ema_every: int = 1  # update the EMA every this many optimizer steps
    prediction_type: PredictionType | None = None  # None = the model's; "v_prediction" trains (and exports) a v-prediction model
    optimizer: Optimizer = "adamw"  # "adamw": torch's fused AdamW; the others need their package (docs/training.md, Optimizers)
    # prodigy (prodigyopt), at train.lr=1.0; it also takes adam_beta1/2, adam_eps and weight_decay. The defaults are
    # diffusers' advanced DreamBooth script's and Prodigy's README ("Diffusion models"): bias correction and safeguard warmup on.
    prodigy_d_coef: float = 1.0  # multiplies Prodigy's estimated step size d: tune this, not train.lr
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    # lion (lion-pytorch): Chen et al. 2023's (and the library's) betas; lr 3-10x below AdamW's, weight decay 3-10x above.
    lion_beta1: float = 0.9
    lion_beta2: float = 0.99
    # adafactor (torch.optim.Adafactor; Shazeer & Stern 2018): torch's defaults. It has no first moment.
    adafactor_beta2_decay: float = -0.8  # the second moment's decay rate is 1 - step^beta2_decay
    adafactor_d: float = 1.0  # the update's RMS is clipped to this
    fused_backward: bool = False  # step each weight inside backward and free its gradient (one process, no clipping/accumulation)
    sharding: Sharding = "ddp"  # "ddp": each rank holds all trained weights; "fsdp" (FSDP2): 1/N of them, sharded checkpoints
    collective_timeout_s: float = 600.0  # a collective waiting longer (a rank stopped answering) ends the job, naming the rank



def optimizer_settings(train: TrainSection) -> dict:
    """The keyword settings train.optimizer is built with (training/optimizers.py), besides its
    parameter groups; kohya's ss_optimizer metadata records the same (io/lora_files.py)."""
    adam = {"weight_decay": train.weight_decay, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_eps}
    if train.optimizer in ("adamw", "adamw8bit", "adamw-schedulefree"):
        return adam  # schedule-free's own warmup_steps stays 0: train.warmup_steps ramps its lr (the same arithmetic)
    if train.optimizer == "prodigy":
        return adam | {"d_coef": train.prodigy_d_coef, "use_bias_correction": train.prodigy_use_bias_correction,
                       "safeguard_warmup": train.prodigy_safeguard_warmup}
    if train.optimizer == "lion":
        return {"weight_decay": train.weight_decay, "betas": (train.lion_beta1, train.lion_beta2)}
    if train.optimizer == "adafactor":
        return {"weight_decay": train.weight_decay, "beta2_decay": train.adafactor_beta2_decay, "d": train.adafactor_d}
    raise ValueError(f"unknown train.optimizer {train.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")

@dataclass(frozen=True)
class LoRASection:
    """Low-rank adapters instead of the full fine-tune (models/lora.py); scale = alpha / rank, as kohya and the UIs."""

    rank: int = 0  # 0 = train the full weights; e.g. 4-32 trains adapters only
    alpha: float | None = None  # None = rank (scale 1)
    targets: LoRATargets = "transformer"  # UNet layers: "transformer" is kohya's default; "all" adds the ResBlock convs
    text_encoder_rank: int = 0  # 0 = text encoder frozen; > 0 adds adapters to its attention and MLP layers
    dropout: float = 0.0  # on each adapter's input, during training only
    init_seed: int = 0  # the adapters' initialisation (the text encoder's uses init_seed + 1)


@dataclass(frozen=True)
class CheckpointSection:
    every_n_steps: int = 200
    keep_last: int = 2


@dataclass(frozen=True)
class RunSection:
    output_dir: str = "runs/dreambooth"
    resume: str = "none"  # "none" | "latest" (the newest intact checkpoint; an error when there is none) | "auto" (the same, or a fresh start) | a checkpoint folder
    tensorboard: bool = False
    wandb: bool = False  # Weights & Biases (pip install wandb): the config, metrics, grids and scores; WANDB_MODE=offline works
    wandb_project: str = "minidream"
    wandb_name: str | None = None  # the W&B run's display name; None = the run folder's name
    log_every_n_steps: int = 10  # how often the host reads losses back from the GPU (metrics keep every step)
    export_dtype: FilePrecision = "fp16"  # dtype of the exported model.safetensors
    export_ema: ExportEMA = "ema"  # with train.ema_decay: "ema" exports the EMA; "both": raw + the UNet's EMA as model_ema.*
    export_merged: bool = False  # with lora.rank: also write model.safetensors, the LoRA merged into the base


@dataclass(frozen=True)
class ValidationSection:
    prompts: tuple[str, ...] = ()
    every_n_steps: int = 200
    sampler: Sampler = "ddim"  # any of sample.py's (docs/sampling.md)
    karras: bool = False  # Karras sigmas, for the samplers that have them
    steps: int = 25
    guidance: float = 7.5
    guidance_rescale: float = 0.0  # Lin et al. 2024 eq. 15-16; 0.7 is their choice for zero-terminal-SNR models
    seed: int = 0


@dataclass(frozen=True)
class EvalSection:
    """The DreamBooth paper's scores during training (minidream/evaluate.py), into metrics.jsonl."""

    every_n_steps: int = 0  # 0 = off; else DINO, CLIP-I and CLIP-T of the current weights every this many steps
    clip: str | None = None  # the evaluation CLIP: a transformers folder or an open_clip .safetensors file
    dino: str | None = None  # DINO ViT-S/16: a transformers folder
    class_noun: str = "dog"  # picks the paper's prompt list (live subjects for dog/cat, objects otherwise)
    identifier: str = "sks"
    prompts: tuple[str, ...] = ()  # empty = the first num_prompts of the paper's list, with identifier and class noun
    num_prompts: int = 4
    images_per_prompt: int = 1
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train.py` reads; YAML files and `a.b=c` overrides fill it (see config_file.py)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoRASection = field(default_factory=LoRASection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    eval: EvalSection = field(default_factory=EvalSection)


ARCHITECTURES = {
    "sd15": SD15, "tiny": TINY, "sd21": SD21, "sd21-base": SD21_BASE, "tiny-sd2": TINY_SD2,
    "sdxl": SDXL, "tiny-sdxl": TINY_SDXL,
}


# Pixels per latent side: the VAE halves the image at each of its levels after the first, and every SD
# family's VAE has four (diffusers' vae_scale_factor = 2^(len(block_out_channels) - 1) = 8). An image
# side must be a multiple of it; the UNet takes any latent size (each upsample meets its skip's size).
PIXELS_PER_LATENT = 8


def check_image_size(width: int, height: int, what: str) -> None:
    """ConfigError, in one line naming `what`, unless both sides are positive multiples of
    PIXELS_PER_LATENT, the VAE's downsampling; the nearest valid sizes are named:
    `data.resolution=63: image sides must be multiples of 8 (the VAE's downsampling); nearest: 56 or 64`."""
    multiple = PIXELS_PER_LATENT
    if width > 0 and height > 0 and width % multiple == 0 and height % multiple == 0:
        return

    def down(side: int) -> int:
        return side - side % multiple if side > 0 else 0

    def up(side: int) -> int:
        return max(-(-side // multiple) * multiple, multiple)

    candidates = [(down(width), down(height)), (up(width), up(height))]
    valid = list(dict.fromkeys(c for c in candidates if c[0] > 0 and c[1] > 0))
    nearest = " or ".join(str(w) if width == height else f"{w}x{h}" for w, h in valid)
    raise ConfigError(f"{what}: image sides must be multiples of {multiple} (the VAE's downsampling); nearest: {nearest}")


# --- Evaluation models (the DreamBooth paper's DINO, CLIP-I, CLIP-T; see minidream/evaluate.py) ---
# They live here, beside the SD parts, because they are components like any other: frozen,
# torch-free, read from a checkpoint's config.json by minidream/io/eval_models.py.


@dataclass(frozen=True)
class VisionTransformerConfig:
    """A ViT image tower: CLIP's (quick_gelu, eps 1e-5) or DINO's (exact gelu, transformers' eps 1e-12).

    Field names equal TextEncoderConfig's where they mean the same, so CLIP's encoder layers
    (models/clip.py) build from either.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP: image tower, text tower, and the shared embedding width both project to."""

    vision: VisionTransformerConfig = field(default_factory=VisionTransformerConfig)
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(width=512, heads=8, mlp_width=2048))
    projection_dim: int = 512


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """How a reference image processor turns a photo into pixel values (PIL, then float32).

    resize="shortest_edge": the short side becomes `size` (aspect kept), then a centred
    `crop_size` crop (CLIPImageProcessor); resize="square": `size` x `size`, aspect not
    kept, no crop (ViTImageProcessor).
    """

    resize: str = "shortest_edge"  # "shortest_edge" | "square"
    size: int = 224
    crop_size: int | None = 224
    resample: str = "bicubic"  # "bicubic" | "bilinear" (PIL's filters)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


# OpenAI's CLIP ViT-B/32 (openai/clip-vit-base-patch32) and ViT-L/14 (openai/clip-vit-large-patch14).
CLIP_VIT_B32 = CLIPConfig()
CLIP_VIT_L14 = CLIPConfig(
    vision=VisionTransformerConfig(patch_size=14, width=1024, layers=24, heads=16, mlp_width=4096),
    text=TextEncoderConfig(width=768, heads=12, mlp_width=3072),
    projection_dim=768,
)
# DINO ViT-S/16 (facebook/dino-vits16) with transformers' ViT defaults for the activation and
# layer-norm eps; a real file's config.json is read as it stands (io/eval_models.py).
DINO_VIT_S16 = VisionTransformerConfig(
    patch_size=16, width=384, layers=12, heads=6, mlp_width=1536, activation="gelu", layer_norm_eps=1e-12
)
CLIP_PREPROCESS = ImagePreprocessConfig()
# facebook/dino-vits16's preprocessor_config.json: ViTFeatureExtractor, size 224 (square),
# resample 2 (bilinear), ImageNet mean/std, rescale 1/255.
DINO_PREPROCESS = ImagePreprocessConfig(
    resize="square", crop_size=None, resample="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)


# ---- configs as plain data: YAML files, checkpoint metadata ----------------------------------


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


def from_dict(cls: type, data: dict, where: str, sep: str = ": "):
    """Build dataclass `cls` from a (nested) mapping, checking every key and type.

    Errors name the key as `where`, `sep`, key: "c.yaml: train", then "c.yaml: train.lr" inside it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{suggestion(key, fields)}")
        values[key] = coerce(value, hints[key], f"{where}{sep}{key}")
    return cls(**values)


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) for writing YAML."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    return out


def members(hint) -> tuple:
    """The alternatives of a `X | Y` annotation, or (hint,) for a plain one."""
    return typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)


def takes_text(hint) -> bool:
    """Whether a field of this type holds text: a str, or one of a Literal's names."""
    return any(member is str or typing.get_origin(member) is Literal for member in members(hint))


def coerce(value, hint, where: str):
    """`value` (as YAML read it) as a `hint`; ConfigError naming `where` when it is not one."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where, sep=".")
    alternatives = members(hint)
    if value is None:
        if type(None) in alternatives:
            return None
        raise ConfigError(f"{where}: must not be empty")
    for member in alternatives:
        if dataclasses.is_dataclass(member) and isinstance(value, dict):  # e.g. text_encoder_2: TextEncoderConfig | None
            return from_dict(member, value, where, sep=".")
        if member is bool and isinstance(value, bool):
            return value
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if member is float and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-6" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if member is str and isinstance(value, str):
            return value
        if typing.get_origin(member) is Literal and isinstance(value, str):
            choices = typing.get_args(member)
            if value not in choices:
                raise ConfigError(f"{where}={value!r} is not one of {', '.join(choices)}")
            return value
        if typing.get_origin(member) is tuple and isinstance(value, list):
            (item,) = {a for a in typing.get_args(member) if a is not Ellipsis}
            return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    expected = " or ".join(_type_name(m) for m in alternatives)
    quote = " (YAML reads yes/no/on/off as booleans: quote the word, e.g. \"no\")" if isinstance(value, bool) else ""
    raise ConfigError(f"{where}: expected {expected}, got {value!r}{quote}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list"
    if typing.get_origin(hint) is Literal:
        return "str"  # one of its names
    return "null" if hint is type(None) else hint.__name__


def suggestion(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid: {', '.join(sorted(valid))})"
