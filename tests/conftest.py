"""Shared test settings, and the training runs several test files compare against."""

import functools
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from sample_runs import load_sample_script, use_lms_quadrature
from train_runs import run_setup, write_training_data

from minidream.models.tokenizer import CLIPTokenizer

# These machines are shared and noisy: per-example deadlines would fail on timing, not on
# behaviour. CI derandomizes so a landing never hinges on a lucky draw; locally each run
# explores new examples.
settings.register_profile("local", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "local")


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory) -> Path:
    """minidream's CLIP tokenizer saved as transformers' files, for the diffusers pipelines the tests build."""
    folder = tmp_path_factory.mktemp("tokenizer")
    CLIPTokenizer().save_folder(folder)
    return folder


@pytest.fixture(scope="session")
def training_data(tmp_path_factory):
    """Subject and class images for the training tests (see train_runs.write_training_data)."""
    return write_training_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def one_thread():
    """In-process training with the thread count of the subprocess runs (train_runs.ENVIRONMENT)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, training_data):
    """`uninterrupted(setup)`: the run directory of an uninterrupted STEPS-step run of that
    train_runs.SETUPS entry, run once per session on first use."""

    @functools.cache
    def run(setup: str):
        run_dir = tmp_path_factory.mktemp(setup)
        result = run_setup(run_dir, training_data, setup)
        assert result.returncode == 0, result.stdout + result.stderr
        return run_dir

    return run


@pytest.fixture(scope="module")
def sample():
    """sample.py as a module, so tests call its main() in-process."""
    return load_sample_script()


@pytest.fixture
def lms_quadrature(monkeypatch):
    """diffusers' LMS scheduler made to run without scipy (sample_runs.GaussLegendre20)."""
    use_lms_quadrature(monkeypatch)
