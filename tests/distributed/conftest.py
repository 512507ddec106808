"""One local Ray for the module tests of the distributed engines, started once and shut down at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])

TEXTS = [
    "The cat sat on the mat.",
    "A much longer sentence about markets, rates and the central bank's decision on Tuesday.",
    "Rain.",
    "Officials said the bridge would reopen next week after repairs.",
    "She read the letter twice, then put it away without a word.",
    "Stocks fell.",
    "The committee, which met in private, did not publish its minutes.",
    "Birds sang in the trees near the old station.",
    "He asked whether the train to the coast was still running.",
    "Prices of fresh fruit rose sharply over the summer months.",
    "Nobody knew.",
    "The museum opened a new wing devoted to modern sculpture and design.",
    "Two players were injured in the second half.",
    "Local schools will close early on Friday.",
]
"""Fourteen sentences of mixed lengths: 4 shards of 4 (the last of 2), 2 batches of 3 per shard."""


@pytest.fixture(scope="session")
def ray_session():
    """``ray`` initialised on 2 CPUs; workers import this checkout's sparsefinder (checked)."""
    ray = pytest.importorskip("ray")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})

    @ray.remote(num_cpus=0.1)
    def where() -> str:
        import sparsefinder

        return sparsefinder.__file__

    import sparsefinder

    assert ray.get(where.remote()) == sparsefinder.__file__
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return list(TEXTS)
