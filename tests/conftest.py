"""Shared fixtures: one Ray instance per session, the tiny Idefics2 built once, sample PDFs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the Hugging Face Hub: the default checkpoint must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actors.tiny import build_tiny_idefics2
from jobs.samples import write_samples

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "format-corpus"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "tiny-idefics2")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_pdfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pdfs")
    write_samples(directory, count=4)
    return directory
