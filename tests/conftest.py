"""Shared fixtures: the repository, the real CodeAlpaca sample (when present), a tiny model built once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "codealpaca" / "code_alpaca_2k.json"


def snakemake_cmd(*args, workdir: Path) -> list[str]:
    """`snakemake` on this repo's Snakefile, run in ``workdir`` (a fresh temp dir in tests)."""
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *map(str, args)]


def run_snakemake(*args, workdir: Path, env: dict | None = None, check: bool = True, timeout: int = 900):
    proc = subprocess.run(snakemake_cmd(*args, workdir=workdir), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def codealpaca_sample() -> Path:
    if not SHARED_SAMPLE.is_file():
        pytest.skip(f"real CodeAlpaca sample not found at {SHARED_SAMPLE}")
    return SHARED_SAMPLE


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """The tiny preset's dataset, prepared into train / eval splits."""
    from lorasweep import data, tiny

    d = tmp_path_factory.mktemp("tinydata")
    src = tiny.write_tiny_dataset(d / "tiny.json")
    paths = {"source": src, "train": d / "train.jsonl", "eval": d / "eval.jsonl", "summary": d / "summary.json"}
    data.prepare(src, paths["train"], paths["eval"], paths["summary"], eval_size=0.1, seed=0)
    return paths


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> Path:
    from lorasweep import tiny

    out = tmp_path_factory.mktemp("tinymodel") / "opt-tiny"
    return tiny.build_tiny_model_from_jsonl(tiny_data["train"], out)


@pytest.fixture
def tiny_config(tiny_model, tiny_data):
    """A validated config on the tiny model, short runs on the CPU."""
    from lorasweep.config import validate_config

    def make(**training):
        return validate_config({
            "model": {"name_or_path": str(tiny_model)},
            "dataset": {"source": str(tiny_data["source"])},
            "methods": {"full": {"learning_rate": 1e-3}, "lora": {"ranks": [8], "learning_rate": 5e-3},
                        "qlora": {"ranks": [8], "learning_rate": 5e-3}},
            "training": {"device": "cpu", "max_steps": 12, "batch_size": 8, "max_length": 128, "evals": 2,
                         "logging_steps": 2, **training},
            "seed": 0,
        })

    return make


def build_tiny_gpt2(tokenizer_dir: Path, out: Path, n_positions: int = 256) -> Path:
    """A random GPT-2 (Conv1D layers, weights [in, out]) of the tiny model's size, with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_model, tmp_path_factory) -> Path:
    return build_tiny_gpt2(tiny_model, tmp_path_factory.mktemp("tinygpt2") / "gpt2-tiny")
