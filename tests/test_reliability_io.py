"""Issue 32, the parts in the writers, readers and commands: output files get the umask's mode,
sizes are checked against the model before it loads, full or unwritable destinations are one line
naming the destination, and the messages of item 10 and 11 say what they mean."""

import errno
import os
import pickle
import re
import stat
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image
from test_convert import tiny, tiny_file  # noqa: F401 (fixtures)
from test_lora_files import adapt

import minidream.evaluate
from minidream import save_pipeline
from minidream.config import TINY, ConfigError, check_image_size
from minidream.files import WriteError, atomic_file, atomic_folder, write_errors
from minidream.io import convert
from minidream.io.lora_files import save_lora
from minidream.io.tensor_files import WeightsError, read_torch_checkpoint
from minidream.models.pipeline import random_pipeline
from minidream.training.config_file import load_train_config
from minidream.training.data import DataError, find_images, scan_images

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"
PROMPT = "a photo of sks dog"
SMALL = ["--steps", "2", "--height", "32", "--width", "32", "--dtype", "fp32", "--device", "cpu"]
FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors raises


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(*paths: Path) -> dict[str, str]:
    """{file: its permission bits in octal} of every file under `paths`."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}


def one_error_line(stderr: str) -> str:
    """The one error line, last in stderr (a progress bar may come before it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and stderr.endswith(errors[0] + "\n"), stderr
    return errors[0]


# ---- item 5: files others can read -------------------------------------------------------------


def test_every_model_and_lora_writer_gives_the_mode_the_umask_gives(tiny, tiny_file, tmp_path, umask_022):
    save_pipeline(tiny, tmp_path / "model.safetensors")
    save_pipeline(tiny, tmp_path / "diffusers", format="diffusers")
    donor = adapt(random_pipeline(TINY))
    save_lora(tmp_path / "lora.safetensors", donor.unet, donor.text_encoder)
    assert convert.main([str(tiny_file), str(tmp_path / "converted.safetensors")]) == 0
    with atomic_folder(tmp_path / "checkpoint") as folder:  # as training/checkpoint.py writes one
        safetensors.torch.save_file({"w": torch.zeros(2)}, folder / "unet.safetensors")
        torch.save({"step": 1}, folder / "trainer.pt")
    found = modes(tmp_path)
    assert len(found) > 10
    assert set(found.values()) == {"0o644"}, found
    assert oct(stat.S_IMODE((tmp_path / "checkpoint").stat().st_mode)) == "0o755"


def test_a_stricter_umask_is_kept(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_file(tmp_path / "a.safetensors") as temporary:
            safetensors.torch.save_file({"w": torch.zeros(2)}, temporary)
    finally:
        os.umask(old)
    assert modes(tmp_path) == {str(tmp_path / "a.safetensors"): "0o600"}


# ---- item 2: sizes the model can take, before it loads ---------------------------------------------


@pytest.mark.parametrize("width, height, what, message", [
    (63, 63, "data.resolution=63", "data.resolution=63: image sides must be multiples of 8 (the VAE's downsampling); "
                                   "nearest: 56 or 64"),
    (100, 100, "--width 100 --height 100", "--width 100 --height 100: image sides must be multiples of 8 (the VAE's "
                                           "downsampling); nearest: 96 or 104"),
    (512, 604, "--width 512 --height 604", "image sides must be multiples of 8 (the VAE's downsampling); nearest: 512x600 or 512x608"),
    (0, 64, "bucket 0x64", "nearest: 8x64"),
])
def test_a_size_the_model_cannot_take_is_one_line_with_the_nearest_valid_sizes(width, height, what, message):
    with pytest.raises(ConfigError) as error:
        check_image_size(width, height, what)
    assert "\n" not in str(error.value) and message in str(error.value) and str(error.value).startswith(what)


def test_sizes_the_model_takes_pass():
    """Any multiple of 8: the UNet takes any latent size (tests/test_sizes.py samples and trains at 72x56
    and 72, which are not multiples of 64 or 32)."""
    for width, height in [(512, 768), (72, 56), (8, 8), (1024, 1016)]:
        check_image_size(width, height, "x")


def test_sample_refuses_a_size_before_the_model_loads(sample, tiny_file, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(sample, "load_pipeline", no_load)
    args = ["--weights", str(tiny_file), "--prompt", PROMPT, "--out", str(tmp_path / "out"), *SMALL, "--height", "44"]
    assert sample.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--width 32 --height 44: image sides must be multiples of 8 (the VAE's downsampling); nearest: 32x40 or 32x48" in line
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_size_before_any_model_loads(tiny_file, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("no model must load")

    for name in ("load_pipeline", "load_clip", "load_dino"):
        monkeypatch.setattr(minidream.evaluate, name, no_load)
    args = ["--weights", str(tiny_file), "--subject-dir", str(tmp_path), "--class-noun", "dog", "--clip", "clip",
            "--dino", "dino", "--out", str(tmp_path / "eval"), *SMALL, "--width", "70"]
    assert minidream.evaluate.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--width 70 --height 32: image sides must be multiples of 8 (the VAE's downsampling); nearest: 64x32 or 72x32" in line


def test_the_help_and_the_docs_give_the_real_size_rule(sample, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a multiple of 8, the VAE's downsampling, for every model" in text and "multiples of 64" not in text
    for name in ("sampling.md", "training.md", "sdxl.md"):
        docs = " ".join((REPO / "docs" / name).read_text().split())
        assert re.search(r"multiples? of \**8\b", docs) and not re.search(r"multiples? of \**(16|32|64)\b", docs), name


# ---- items 1 and 8: full and unwritable destinations ------------------------------------------------


def test_sample_writes_inside_runs_by_default(sample):
    assert sample.parse_args(["--weights", "w", "--prompt", "p"]).out == Path("runs/samples")
    assert "/runs/" in (REPO / ".gitignore").read_text().splitlines()


def test_sample_to_an_unwritable_place_is_one_line_before_the_model_loads(sample, tiny_file, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(sample, "load_pipeline", no_load)
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"  # no folder can be made under a file, even by root
    assert sample.main(["--weights", str(tiny_file), "--prompt", PROMPT, "--out", str(out), *SMALL]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {out}: ") and ".tmp" not in line


def test_sample_on_a_full_disk_is_one_line_naming_the_file(sample, tiny_file, tmp_path, capsys, monkeypatch):
    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "out"
    assert sample.main(["--weights", str(tiny_file), "--prompt", PROMPT, "--out", str(out), *SMALL]) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: cannot write {out / '00000-0.png'}: No space left on device"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("raised, cause", [
    (safetensors.SafetensorError(FULL_DISK), "No space left on device"),
    (safetensors.SafetensorError('Error while serializing: I/O error: Permission denied (os error 13) at path "/x/.tmpA"'),
     "Permission denied"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/.tmp-name"), "Permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/x/.tmp-name"), "Read-only file system"),
], ids=["full", "safetensors-denied", "denied", "read-only"])
def test_convert_to_a_full_or_unwritable_place_is_one_line_naming_the_destination(
    tiny_file, tmp_path, capsys, monkeypatch, raised, cause
):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    dst = tmp_path / "out.safetensors"
    assert convert.main([str(tiny_file), str(dst)]) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: cannot write {dst}: {cause}"
    assert list(tmp_path.iterdir()) == []


def test_the_io_writers_raise_one_write_error_for_a_full_disk(tiny, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise safetensors.SafetensorError(FULL_DISK)

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    donor = adapt(random_pipeline(TINY))
    for write, path, named in [
        (lambda p: save_pipeline(tiny, p), tmp_path / "model.safetensors", ""),
        # a file inside a folder is named by its place in the destination, not in the temporary folder
        (lambda p: save_pipeline(tiny, p, format="diffusers"), tmp_path / "diffusers", "unet/diffusion_pytorch_model.safetensors"),
        (lambda p: save_lora(p, donor.unet, donor.text_encoder), tmp_path / "lora.safetensors", ""),
    ]:
        with pytest.raises(WriteError) as error:
            write(path)
        assert str(error.value) == f"cannot write {path / named if named else path}: No space left on device"
        assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
        assert error.value.strerror == "No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_a_torch_save_that_runs_out_of_space_says_so(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 388224 vs 388116")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr("minidream.files.free_bytes", lambda path: 0)
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'step'}: No space left on device$"):
        with atomic_folder(tmp_path / "step") as folder:
            torch.save({}, folder / "optimizer.pt")
    monkeypatch.setattr("minidream.files.free_bytes", lambda path: 10**12)
    with pytest.raises(WriteError, match=r"unexpected pos 388224 vs 388116"):
        with atomic_folder(tmp_path / "step") as folder:
            torch.save({}, folder / "optimizer.pt")
    assert list(tmp_path.iterdir()) == []


def test_write_errors_leave_other_errors_alone(tmp_path):
    with pytest.raises(RuntimeError, match="CUDA error"):
        with write_errors(tmp_path / "x"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(ValueError):
        with write_errors(tmp_path / "x"):
            raise ValueError("not a write")
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'x'}: Disk quota exceeded$"):
        with write_errors(tmp_path / "x"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / ".x.tmp"))


# ---- item 10: messages that say what they mean ------------------------------------------------------


def test_an_instance_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=rf"^instance folder {tmp_path / 'photo.jpg'} is a file, not a folder"):
        find_images(tmp_path / "photo.jpg", "instance")


def test_a_skipped_image_is_named_without_the_advice_to_skip(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan_images(tmp_path, "p", 64, skip_bad=True, what="instance")
    [message] = [str(w.message) for w in caught]
    assert message.startswith(f"skipping {tmp_path / 'notes.png'}: cannot decode (") and "skip_bad_images" not in message


def test_a_plain_pickle_ckpt_is_refused_in_one_clear_line(tmp_path):
    path = tmp_path / "model.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(2)}}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol" warning must not escape either
        with pytest.raises(WeightsError) as error:
            read_torch_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and "Unsupported operand" not in message
    assert message.startswith(f"{path}: refused: a plain Python pickle, not a PyTorch checkpoint")
    assert "weights_only" in message and "safetensors" in message


# ---- item 11: your photos with the example's prompts ----------------------------------------------


def test_your_photos_with_the_examples_prompts_say_which_prompt_and_prior_they_use(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = load_train_config(TINY_YAML, ["data.instance_dir=photos/my-dog"])
    assert cfg.data.instance_prompt == "a photo of sks toy"  # kept, but said
    [line] = capsys.readouterr().out.splitlines()  # stdout, with train.py's other lines
    assert line.startswith("note: data.instance_dir=photos/my-dog is trained as 'a photo of sks toy'")
    assert "data.class_dir=runs/tiny/class-images" in line and "'a photo of a toy'" in line
    assert "data.instance_prompt" in line and "data.class_prompt" in line


@pytest.mark.parametrize("overrides, said", [
    ([], None),  # the embedded default alone: its own subject
    (["data.instance_dir=d", "data.instance_prompt=a photo of qwe dog", "data.class_prompt=a photo of a dog",
      "data.class_dir=runs/class/dog"], None),
    (["data.instance_dir=d", "data.instance_prompt=a photo of qwe dog", "data.class_dir=null"], None),
    (["data.instance_dir=d", "data.instance_prompt=a photo of qwe dog"], "prior data.class_dir=runs/tiny/class-images"),
    (["data.instance_dir=d", "data.class_dir=c"], "is trained as 'a photo of sks toy' with prior data.class_dir=c"),
])
def test_the_note_names_only_what_you_left_at_the_examples_values(capsys, monkeypatch, overrides, said):
    monkeypatch.delenv("RANK", raising=False)
    load_train_config(TINY_YAML, overrides)
    out = capsys.readouterr().out
    if said is None:
        assert out == ""
    else:
        assert out.count("\n") == 1 and said in out


def test_the_note_is_printed_once_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    load_train_config(TINY_YAML, ["data.instance_dir=photos/my-dog"])
    assert capsys.readouterr().out == ""


def test_a_run_folders_config_read_back_says_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    from minidream.training.config_file import save_config

    save_config(load_train_config(TINY_YAML, ["data.instance_dir=photos/my-dog"]), tmp_path / "config.yaml")
    capsys.readouterr()
    load_train_config(tmp_path / "config.yaml", [])
    assert capsys.readouterr().out == ""
