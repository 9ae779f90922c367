"""Frozen configuration dataclasses for every component.

The defaults are Stable Diffusion 1.5; `TINY` is a small model of the same architecture that
runs in seconds on a CPU. Nothing here imports torch, so configs load before any model does.
"""

from dataclasses import dataclass, field


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
    transformer_depth: int = 1
    context_dim: int = 768  # SD 2.x: 1024
    use_linear_proj: bool = False  # SD 2.x: proj_in/proj_out are Linear instead of 1x1 Conv
    norm_groups: int = 32
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL with 8x spatial downsampling (SD 1.x/2.x)."""

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
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """All parts of a Stable Diffusion pipeline."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


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


@dataclass(frozen=True)
class ModelSection:
    architecture: str = "sd15"  # "sd15" | "tiny": the shapes to build when no weights are given
    weights: str | None = None  # checkpoint file or folder; None = random init (tiny runs, tests)
    use_ema: bool = False  # take model_ema.* weights from single files that carry them


@dataclass(frozen=True)
class DataSection:
    instance_dir: str = ""
    instance_prompt: str = "a photo of sks dog"
    example_subject: bool = False  # draw the built-in example subject into instance_dir (embedded default)
    class_dir: str | None = None  # None = no prior preservation
    class_prompt: str = "a photo of dog"
    num_class_images: int = 200
    resolution: int = 512
    center_crop: bool = True  # False = random crop
    random_flip: bool = False
    skip_bad_images: bool = False  # True = warn and skip undecodable files instead of stopping
    class_sampler: str = "ddim"
    class_steps: int = 50
    class_guidance: float = 7.5
    class_batch_size: int = 4


@dataclass(frozen=True)
class TrainSection:
    max_steps: int = 800
    batch_size: int = 1  # instance images per optimizer step per rank (class images double it)
    lr: float = 2e-6
    text_encoder_lr: float | None = None  # None = same as lr
    lr_schedule: str = "constant"  # "constant" | "linear" | "cosine"
    warmup_steps: int = 0
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    seed: int = 0
    cache_latents: bool = True  # encode each image once when the transforms are deterministic
    compile: bool = False  # torch.compile the UNet (one graph, no breaks: fullgraph=True)
    device: str = "auto"  # "auto" (this rank's GPU if any, else CPU) | "cpu" | "cuda"
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite losses


@dataclass(frozen=True)
class CheckpointSection:
    every_n_steps: int = 200
    keep_last: int = 2


@dataclass(frozen=True)
class RunSection:
    output_dir: str = "runs/dreambooth"
    resume: str = "none"  # "none" | "latest" | a checkpoint folder
    tensorboard: bool = False
    log_every_n_steps: int = 10  # how often the host reads losses back from the GPU (metrics keep every step)
    export_dtype: str = "fp16"  # dtype of the exported model.safetensors: "fp16" | "fp32"


@dataclass(frozen=True)
class ValidationSection:
    prompts: tuple[str, ...] = ()
    every_n_steps: int = 200
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train.py` reads; YAML files and `a.b=c` overrides fill it (see config_file.py)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)
    validation: ValidationSection = field(default_factory=ValidationSection)


ARCHITECTURES = {"sd15": SD15, "tiny": TINY}


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
