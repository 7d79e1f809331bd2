"""Shared fixtures: tiny Llama models built from configs, a word-level tokenizer and a generated task."""

import os


# Before any Hugging Face import: no network (the push tests lift this for themselves), no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib

import pytest
import torch


torch.set_num_threads(1)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """`../shared/data`, or skip (the data is never committed into the project)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from hf_taskdistill.toy import build_toy_tokenizer

    return build_toy_tokenizer()


@pytest.fixture
def teacher(tokenizer):
    """Wider and deeper than the student: hidden 32, 3 layers."""
    from hf_taskdistill.toy import tiny_llama

    return tiny_llama(len(tokenizer), hidden_size=32, num_layers=3, seed=1)


@pytest.fixture
def student(tokenizer):
    """Hidden 16, 2 layers."""
    from hf_taskdistill.toy import tiny_llama

    return tiny_llama(len(tokenizer), hidden_size=16, num_layers=2, seed=2)


@pytest.fixture(scope="session")
def toy_rows():
    from hf_taskdistill.toy import make_toy_examples

    return make_toy_examples(32, seed=0)


@pytest.fixture
def messages_dataset(toy_rows):
    from datasets import Dataset

    from hf_taskdistill.toy import to_messages

    return Dataset.from_list([to_messages(r) for r in toy_rows])


@pytest.fixture
def prompt_completion_dataset(toy_rows):
    from datasets import Dataset

    from hf_taskdistill.toy import to_prompt_completion

    return Dataset.from_list([to_prompt_completion(r) for r in toy_rows])


def make_config(tmp_path, **overrides):
    """A small, fast, deterministic TaskFeatureDistillConfig for CPU tests."""
    from hf_taskdistill import TaskFeatureDistillConfig

    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        selection_num_samples=16,
        logging_steps=1,
        activation_checkpointing=False,
        bf16=False,
        max_length=64,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TaskFeatureDistillConfig(**kwargs)
