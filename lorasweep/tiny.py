"""The ``tiny`` preset: a small CodeAlpaca-style dataset and a small OPT model built locally.

Both are deterministic for a given seed, need no network, and exercise exactly the code paths the
real experiment uses (``from_pretrained`` on a saved directory, CodeAlpaca's record schema).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Dataset: a few hundred coding instructions in CodeAlpaca's schema (instruction / input / output)
# ---------------------------------------------------------------------------------------------

_NAMES = ["numbers", "values", "items", "data", "nums", "xs", "scores", "arr"]
_WORDS = ["apple", "banana", "cherry", "kiwi", "mango", "orange", "pear", "plum", "grape", "lemon",
          "hello", "world", "python", "code", "alpaca", "lora", "model", "token"]


def _rand_list(rng: random.Random, n: int | None = None) -> list[int]:
    return [rng.randint(0, 99) for _ in range(n or rng.randint(3, 7))]


def _function_tasks(rng: random.Random) -> dict:
    """A 'write a function' task: no input, code as output."""
    var = rng.choice(_NAMES)
    kind = rng.randrange(12)
    if kind == 0:
        fn = rng.choice(["add", "sum_two", "plus"])
        return dict(instruction=f"Write a Python function called {fn} that returns the sum of two numbers.",
                    output=f"def {fn}(a, b):\n    return a + b")
    if kind == 1:
        return dict(instruction=f"Write a Python function that returns the largest element of a list named {var}.",
                    output=f"def find_max({var}):\n    best = {var}[0]\n    for x in {var}:\n        if x > best:\n"
                           f"            best = x\n    return best")
    if kind == 2:
        return dict(instruction="Write a Python function to reverse a string.",
                    output="def reverse_string(s):\n    return s[::-1]")
    if kind == 3:
        return dict(instruction="Write a Python function that checks whether a string is a palindrome.",
                    output="def is_palindrome(s):\n    return s == s[::-1]")
    if kind == 4:
        return dict(instruction="Write a recursive Python function to compute the factorial of n.",
                    output="def factorial(n):\n    if n <= 1:\n        return 1\n    return n * factorial(n - 1)")
    if kind == 5:
        return dict(instruction="Write a Python function that returns the n-th Fibonacci number.",
                    output="def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a")
    if kind == 6:
        return dict(instruction=f"Write a Python function that counts the even numbers in a list named {var}.",
                    output=f"def count_even({var}):\n    return sum(1 for x in {var} if x % 2 == 0)")
    if kind == 7:
        return dict(instruction="Write a JavaScript function that returns the sum of an array.",
                    output="function sumArray(arr) {\n  return arr.reduce((a, b) => a + b, 0);\n}")
    if kind == 8:
        return dict(instruction="Write a JavaScript function to reverse a string.",
                    output="function reverseString(s) {\n  return s.split('').reverse().join('');\n}")
    if kind == 9:
        return dict(instruction="Write a SQL query that selects all rows from the table employees.",
                    output="SELECT * FROM employees;")
    if kind == 10:
        n = rng.randint(2, 9)
        return dict(instruction=f"Write a Python loop that prints the numbers from 1 to {n}.",
                    output=f"for i in range(1, {n + 1}):\n    print(i)")
    return dict(instruction="Write a Python function that counts the vowels in a string.",
                output="def count_vowels(s):\n    return sum(1 for c in s.lower() if c in 'aeiou')")


def _input_tasks(rng: random.Random) -> dict:
    """A task applied to a concrete input: the output is computed, so it can be learnt."""
    kind = rng.randrange(8)
    if kind == 0:
        xs = _rand_list(rng)
        return dict(instruction="Sort the given list in ascending order.", input=str(xs), output=str(sorted(xs)))
    if kind == 1:
        xs = _rand_list(rng)
        return dict(instruction="Compute the sum of the given list.", input=str(xs), output=str(sum(xs)))
    if kind == 2:
        xs = _rand_list(rng)
        return dict(instruction="Find the maximum value in the list.", input=str(xs), output=str(max(xs)))
    if kind == 3:
        w = rng.choice(_WORDS)
        return dict(instruction="Reverse the given string.", input=w, output=w[::-1])
    if kind == 4:
        w = rng.choice(_WORDS)
        return dict(instruction="Convert the given string to upper case.", input=w, output=w.upper())
    if kind == 5:
        w = rng.choice(_WORDS)
        return dict(instruction="Count the characters in the given string.", input=w, output=str(len(w)))
    if kind == 6:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return dict(instruction="Write a Python expression that adds the two numbers.", input=f"{a}, {b}",
                    output=f"{a} + {b}")
    xs = _rand_list(rng)
    return dict(instruction="Write Python code that prints each element of the list.", input=str(xs),
                output=f"for x in {xs}:\n    print(x)")


def make_tiny_records(n: int = 400, seed: int = 0, n_empty: int = 2) -> list[dict]:
    """``n`` CodeAlpaca-style records (``instruction``, ``input``, ``output``), deterministic for ``seed``.

    ``n_empty`` records have an empty output, as two records of the real CodeAlpaca-20k do, so the
    preparation step's dropping and counting of empty outputs is exercised by the preset.
    """
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < n:  # unique records only: a duplicate across train and eval would leak
        rec = _input_tasks(rng) if rng.random() < 0.7 else _function_tasks(rng)
        rec = {"instruction": rec["instruction"], "input": rec.get("input", ""), "output": rec["output"]}
        key = (rec["instruction"], rec["input"])
        if key not in seen:
            seen.add(key)
            records.append(rec)
    for j in range(min(n_empty, n)):
        records[(j * 7919 + 13) % n]["output"] = ""
    return records


def write_tiny_dataset(path: str | Path, n: int = 400, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(make_tiny_records(n, seed), indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Model: a small OPT with a byte-level BPE tokenizer trained on the training text
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2/OPT style) trained on ``texts``, wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


# facebook/opt-350m's shape (its config.json): 24 post-LN layers of width 1024, embeddings of width 512
# projected in and out, 50,272 tokens, 331 M parameters. Built with random weights it trains at the real
# model's speed and memory, offline; its losses mean nothing (config/opt-350m-shape.yaml).
OPT_350M_SHAPE = dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_dim=4096, vocab_size=50272,
                      word_embed_proj_dim=512, do_layer_norm_before=False, max_positions=2048, embedding_rows=50272)


def opt_config(n_tokens: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, ffn_dim: int = 256,
               max_positions: int = 512, word_embed_proj_dim: int | None = None, do_layer_norm_before: bool = True,
               embedding_rows: int | None = None, special_ids: dict | None = None):
    """The OPTConfig of a model over a tokenizer of ``n_tokens`` tokens (``embedding_rows`` rows if more)."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=max(n_tokens, embedding_rows or 0),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        ffn_dim=ffn_dim,
        num_attention_heads=num_heads,
        word_embed_proj_dim=word_embed_proj_dim or hidden_size,
        do_layer_norm_before=do_layer_norm_before,
        max_position_embeddings=max_positions,
        dropout=0.0,
        attention_dropout=0.0,
        **(special_ids or {}),
    )


def random_opt(n_tokens: int, *, seed: int = 0, **shape):
    """A randomly initialised OPT over ``n_tokens`` tokens, of ``shape`` (see :func:`opt_config`)."""
    import torch
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    return OPTForCausalLM(opt_config(n_tokens, **shape))


def build_tiny_model(texts: list[str], out_dir: str | Path, *, vocab_size: int = 1024, seed: int = 0,
                     **shape) -> Path:
    """Build a randomly initialised OPT model and its tokenizer; save both with ``save_pretrained``.

    The tokenizer is trained on ``texts`` with at most ``vocab_size`` tokens. The embedding has one row per
    token, or ``embedding_rows`` when given (at least the tokenizer's size), so that a real model's shape
    and cost are kept when the text yields fewer tokens than its vocabulary. ``shape``: see
    :func:`opt_config` (the ``model.build_tiny`` keys of the config schema).
    """
    from .provenance import honour_umask

    tokenizer = train_tokenizer(texts, vocab_size)
    model = random_opt(len(tokenizer), seed=seed, **shape, special_ids=dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    honour_umask(out_dir)
    return out_dir


def build_tiny_model_from_jsonl(train_jsonl: str | Path, out_dir: str | Path, **kwargs) -> Path:
    """Build the tiny model with its tokenizer trained on the prepared training split (prompt + completion)."""
    from .data import read_jsonl

    rows = read_jsonl(train_jsonl)  # line by line: str.splitlines would also split at the U+2028 a record may hold
    return build_tiny_model([r["prompt"] + r["completion"] for r in rows], out_dir, **kwargs)
