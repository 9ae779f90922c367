"""YAML presets and `a.b=c` overrides."""

import re
import typing
from pathlib import Path

import pytest
import yaml

from minidream.config import ARCHITECTURES, OPTIMIZERS, ConfigError, ModelSection, TrainConfig, TrainSection, to_dict
from minidream.training.config_file import (
    apply_override,
    load_train_config,
    save_config,
)


EVAL = ["eval.every_n_steps=10", "eval.clip=clip", "eval.dino=dino"]  # eval on (the model paths are checked later)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-6\n  max_steps: 10\nvalidation:\n  prompts: [a, b]\n")
    cfg = load_train_config(path, ["train.lr=1e-5", "data.class_dir=null", "train.batch_size=3", "data.instance_prompt=1984"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 10 and cfg.train.batch_size == 3
    assert cfg.data.class_dir is None
    assert cfg.data.instance_prompt == "1984"
    assert cfg.validation.prompts == ("a", "b")


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'max_step'; did you mean 'max_steps'\?"):
        load_train_config(write(tmp_path, "train:\n  max_step: 10\n"), [])
    with pytest.raises(ConfigError, match=r"unknown key 'lrr'; did you mean 'lr'\?"):
        apply_override(TrainConfig(), "train.lrr=1")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        apply_override(TrainConfig(), "trian.lr=1")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=ten", "expected int, got 'ten'"),
        ("train.max_steps=1.5", "expected int, got 1.5"),
        ("train.train_text_encoder=maybe", "expected bool, got 'maybe'"),
        ("train.lr=fast", "expected float, got 'fast'"),
        ("train=1", "is a section"),
        ("train.lr.x=1", "is a value, not a section"),
        ("train.lr", "not of the form section.key=value"),
        ("train.max_steps=", "must not be empty"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(TrainConfig(), override)


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml", [])
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_train_config(write(tmp_path, "- a\n- b\n"), [])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_train_config(None, ["validation.prompts=[x, 'y z']", "data.class_dir=classes", "train.lr=3e-6"])
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    assert load_train_config(out, []) == cfg
    assert yaml.safe_load(out.read_text()) == to_dict(cfg)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("preset", ["configs/tiny.yaml", "configs/dreambooth-sd15.yaml", "configs/dreambooth-lora-sd15.yaml",
                                    "configs/dreambooth-sd21.yaml", "configs/dreambooth-lora-sdxl.yaml", "configs/dreambooth-sdxl.yaml"])
def test_presets_load(preset):
    from pathlib import Path

    cfg = load_train_config(Path(__file__).resolve().parents[1] / preset, [])
    assert cfg.train.max_steps > 0


def test_names_outside_their_choices_are_refused():
    with pytest.raises(ConfigError, match=r"train.mixed_precision='fp8' is not one of no, fp16, bf16"):
        load_train_config(None, ["train.mixed_precision=fp8"])
    # YAML reads a bare `no` as False: on the command line the typed word is kept; in a file
    # the message says to quote it.
    assert load_train_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_unquoted_yaml_no_gets_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"expected str, got False \(YAML reads yes/no/on/off as booleans"):
        load_train_config(write(tmp_path, "train:\n  mixed_precision: no\n"), [])


@pytest.mark.parametrize("key", ["run.log_every_n_steps", "checkpoint.every_n_steps", "train.batch_size"])
def test_counts_and_intervals_below_one_are_refused(key):
    with pytest.raises(ConfigError, match=f"^{key} must be at least 1, got 0$"):
        load_train_config(None, [f"{key}=0"])


def test_your_photos_turn_the_example_subject_off_and_without_them_it_gets_its_own_folder():
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    default = load_train_config(tiny, ["run.output_dir=runs/x"])
    assert default.data.example_subject and default.data.instance_dir == str(Path("runs/x") / "example-subject")
    yours = load_train_config(tiny, ["data.instance_dir=photos/my-dog"])
    assert yours.data.instance_dir == "photos/my-dog" and not yours.data.example_subject
    assert load_train_config(tiny, ["data.example_subject=true", "data.instance_dir=photos/my-dog"]) == yours


@pytest.mark.parametrize("override, message", [
    ("validation.guidance_rescale=1.5", "validation.guidance_rescale must be in [0, 1], got 1.5"),
    ("model.clip_skip=0", "model.clip_skip must be at least 1, got 0"),
    ("data.class_sampler=dpm-fast", "data.class_sampler='dpm-fast' is not one of ddim, ddpm, euler-a, dpmpp-2m, euler"),
])
def test_sampling_options_are_checked_before_anything_loads(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["train.fused_backward=true", "train.max_grad_norm=null", "train.gradient_accumulation_steps=2"], "cannot accumulate"),
    (["train.fused_backward=true"], "cannot clip by the global gradient norm"),
    (["train.fused_backward=true", "train.max_grad_norm=null", "train.mixed_precision=fp16"], "use train.mixed_precision=bf16"),
    (["lora.rank=4", "train.train_text_encoder=true"], "set lora.text_encoder_rank instead of train.train_text_encoder"),
    (["lora.text_encoder_rank=4"], "lora.text_encoder_rank needs UNet adapters too"),
    (["lora.rank=4", "train.ema_decay=0.9", "run.export_ema=both"], "with LoRA choose ema or raw"),
    (["eval.every_n_steps=10"], "set eval.clip and eval.dino"),
    (["train.max_timestep=10", "train.min_timestep=10"], "must be above train.min_timestep=10"),
    (["train.ema_decay=1.0"], "train.ema_decay must be in (0, 1)"),
    (["train.loss=l1"], "train.loss='l1' is not one of mse, huber, smooth_l1"),
    (["lora.targets=everything"], "lora.targets='everything' is not one of attention, transformer, all"),
    (["train.prediction_type=x0"], "train.prediction_type='x0' is not one of epsilon, v_prediction"),
    ([*EVAL, "eval.prompts=[a sks dog]", "data.subjects=[{instance_dir: a, instance_prompt: a sks dog}]"],
     "eval.prompts with data.subjects: each subject is evaluated on the paper's prompts for its class_noun with its "
     "identifier; leave eval.prompts empty (eval.num_prompts sets how many)"),
    (["train.sharding=fsdp", "train.compile=true"],
     "train.compile with train.sharding=fsdp is not supported: the UNet compiles with fullgraph=True, and FSDP2's "
     "per-block all-gather hooks break the graph; set train.compile=false or train.sharding=ddp"),
    (["train.sharding=fsdp", "train.mixed_precision=fp16"],
     "train.sharding=fsdp with train.mixed_precision=fp16: the loss scaler would check only this rank's gradient shards "
     "for overflow; use train.mixed_precision=bf16 (or no)"),
    (["train.sharding=fsdp", "train.optimizer=adamw8bit"],
     "train.optimizer=adamw8bit cannot step sharded weights; use train.optimizer=adamw with train.sharding=fsdp"),
    (["train.sharding=fsdp", *EVAL],
     "eval.every_n_steps with train.sharding=fsdp: the ranks split the prompts, but every sharded forward needs all "
     "ranks; evaluate the exported model with python -m minidream.evaluate instead"),
])
def test_settings_that_cannot_work_together_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, overrides)


@pytest.mark.parametrize("fsdp_only", [["train.compile=true"], ["train.mixed_precision=fp16"], ["train.optimizer=adamw8bit"], EVAL])
def test_fsdp_limits_leave_ddp_and_lora_alone(fsdp_only):
    """LoRA adapters are replicated under train.sharding=fsdp (training/sharding.py), so its limits do not apply."""
    load_train_config(None, fsdp_only)
    load_train_config(None, ["train.sharding=fsdp", "lora.rank=4", *fsdp_only])


def test_every_choice_is_its_fields_literal():
    """The names a key takes are its field's Literal (config.py): refused by name from an override or
    a file, and the unquoted YAML booleans get their hint."""
    hints = typing.get_type_hints(TrainSection)
    assert typing.get_args(hints["optimizer"]) == OPTIMIZERS
    assert typing.get_args(typing.get_type_hints(ModelSection)["architecture"]) == tuple(ARCHITECTURES)
    assert load_train_config(None, ["train.prediction_type=v_prediction", "train.prediction_type=null"]).train.prediction_type is None


def test_a_name_outside_its_choices_in_a_file_names_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: train.optimizer='sgd' is not one of adamw, adamw8bit, prodigy, lion, adamw-schedulefree, adafactor$"):
        load_train_config(write(tmp_path, "train:\n  optimizer: sgd\n"), [])
    with pytest.raises(ConfigError, match=r"c.yaml: data.subjects\[0\].repeats: expected int, got 'two'$"):
        load_train_config(write(tmp_path, "data:\n  subjects:\n  - {instance_dir: a, instance_prompt: b, repeats: two}\n"), [])


def test_zero_terminal_snr_without_v_prediction_is_refused_before_training(tmp_path, training_data, capsys):
    from train_runs import train_args

    import train

    assert train.main(train_args(tmp_path / "run", training_data, ("model.zero_terminal_snr=true",))) == 2
    assert "set train.prediction_type=v_prediction" in capsys.readouterr().err
