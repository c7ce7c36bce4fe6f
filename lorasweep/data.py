"""Data preparation: load CodeAlpaca-style records, check them, format prompts, split train / eval.

Prepared once per sweep and shared by every run, so that all runs see exactly the same examples.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import random
from pathlib import Path

from .provenance import hub_commit
from .resume import written_whole

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")

# The two prompt templates of Stanford Alpaca, which CodeAlpaca uses, with a newline after "### Response:" (the
# prompt then tokenizes as a prefix of prompt + completion).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ValueError):
    """The dataset cannot be used; the message says which record and why (``record``: its index, from 0)."""

    def __init__(self, message: str, record: int | None = None, detail: str | None = None):
        super().__init__(message)
        self.record, self.detail = record, detail


def _bad_record(i: int, detail: str, line: int | None = None) -> DataError:
    """An error in record ``i``, named as Python, jq and datasets index it (from 0), and for JSON Lines by its
    ``line`` in the file too (from 1, as editors count; blank lines are skipped): "record 5" alone read as the
    fifth record, or line 5, one off."""
    where = f"0-based; line {line} of the file" if line else "0-based"
    return DataError(f"record {i} ({where}): {detail}", record=i, detail=detail)


def _jsonl_records(text: str):
    """(line number from 1, line) of each record of a JSON Lines text: its non-blank lines. Lines end at "\n"
    only: str.splitlines would also split at U+2028, U+2029 and U+0085, which JSON strings may hold unescaped."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield lineno, line


def is_local_source(source: str) -> bool:
    """A dataset source is a local file when it ends in .json / .jsonl / .parquet; otherwise a hub id."""
    return str(source).lower().endswith(LOCAL_SUFFIXES)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def load_records(source: str, split: str = "train", revision: str | None = None) -> list[dict]:
    """Records from a local JSON (a list of objects), JSONL or parquet file, or from a hub dataset id (at its
    ``revision``: a branch, tag or commit; None: main)."""
    if is_local_source(source):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"dataset.source: file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pandas as pd

            try:  # missing values as None, like JSON's null (pandas would give NaN, a float)
                frame = pd.read_parquet(path)
                return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
            except Exception as e:  # noqa: BLE001 - any reader failure means "not a parquet file"
                raise DataError(f"dataset.source: {path} is not a readable parquet file: {e}") from e
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not data
        if suffix == ".jsonl":
            records = []
            for lineno, line in _jsonl_records(text):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"dataset.source: {path} line {lineno} is not valid JSON: {e.msg}") from e
            return records
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and _is_json_object(text[:e.pos]):  # JSON Lines, as datasets' to_json writes
                raise DataError(f"dataset.source: {path} holds one JSON record per line (JSON Lines, which datasets' "
                                f"to_json writes), not a JSON list: rename it to {path.with_suffix('.jsonl').name} "
                                "and point dataset.source at that") from e
            raise DataError(f"dataset.source: {path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                            "expected a list of records like CodeAlpaca's") from e
        if not isinstance(data, list):
            raise DataError(f"dataset.source: {path} holds a JSON {type(data).__name__}, "
                            "expected a list of records (objects with instruction / input / output)")
        return data
    import datasets

    log.info("loading dataset %s (split %s%s) with datasets.load_dataset", source, split,
             f", revision {revision}" if revision else "")
    try:
        ds = datasets.load_dataset(source, split=split, **({"revision": revision} if revision else {}))
    except ValueError as e:  # datasets read the dataset and refused what was asked of it: not the network
        raise DataError(
            f"dataset.source: could not load hub dataset {source!r}, split {split!r} ({type(e).__name__}: "
            f"{' '.join(str(e).split())}). "  # datasets' message runs over lines: one line for the console
            "Set dataset.split to a split it has; a dataset of several configurations (subsets) cannot be named in "
            "lorasweep's settings: save the one you want as a local file (datasets.load_dataset(ID, CONFIG, "
            "split=SPLIT).to_json('data.jsonl')) and point dataset.source at it."
        ) from e
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"dataset.source: could not load hub dataset {source!r} ({type(e).__name__}: {e}). "
            "Without network access, download it elsewhere and point dataset.source at a local "
            ".json/.jsonl/.parquet file in CodeAlpaca's format."
        ) from e
    return ds.to_list()


# field names other datasets give the prompt and the response, for the hint of a record without CodeAlpaca's
_PROMPT_NAMES = ("prompt", "question", "query", "problem", "task", "Instruction")
_RESPONSE_NAMES = ("response", "answer", "completion", "solution", "target", "Output", "Response")


def _fields_hint(rec: dict) -> str:
    """What to do with a record that lacks CodeAlpaca's fields: the renames its own field names suggest."""
    hint = "lorasweep reads CodeAlpaca-style records: 'instruction', 'output' and an optional 'input'; "
    if "messages" in rec or "conversations" in rec:
        return hint + ("chat records (a list of messages) are not read: write each as an instruction (the user's "
                       "turn) and an output (the assistant's reply)")
    if set(rec) <= {"text", "content", "id"}:
        return hint + "a plain-text corpus, with no prompt and response to tell apart, is not read"
    renames = [(key, found[0]) for key, names in (("instruction", _PROMPT_NAMES), ("output", _RESPONSE_NAMES))
               if key not in rec and (found := [name for name in names if name in rec])]
    mapping = ", ".join(f"{key}: {found}" for key, found in renames)
    return hint + "name the dataset's own fields in dataset.fields" + (
        f" ({{{mapping}}})" if renames else ", e.g. {instruction: question, output: answer}")


FIELDS = ("instruction", "input", "output")


def map_fields(records: list, fields: dict | None) -> list:
    """Records with the dataset's own field names (``dataset.fields``: ``{instruction: question, output: answer}``)
    renamed to CodeAlpaca's; a field not named keeps its name, ``input: null`` reads none. Unchanged without one."""
    if not fields:
        return records
    names = {key: fields.get(key, key) for key in FIELDS}
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            out.append(rec)  # check_records names it
            continue
        for key in ("instruction", "output"):
            if names[key] not in rec:
                raise _bad_record(i, f"dataset.fields.{key} = {names[key]!r}, a field this record does not have "
                                     f"(fields: {sorted(rec)})")
        out.append({key: rec.get(name) for key, name in names.items() if name is not None})
    return out


def check_records(records: list) -> tuple[list[dict], dict]:
    """Validate the schema; drop records whose output is empty, and exact repeats of a record kept before (the same
    instruction, input and output: one copy could land in the eval split and another in training, and the eval
    loss would then score memorised examples). Returns (kept, counts)."""
    if not records:
        raise DataError("dataset has no records")
    kept, dropped_empty, seen, repeats = [], 0, set(), 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _bad_record(i, f"expected an object, got {type(rec).__name__}")
        for key in ("instruction", "output"):
            if key not in rec:
                raise _bad_record(i, f"missing field {key!r} (fields: {sorted(rec)}); " + _fields_hint(rec))
        for key in FIELDS:
            value = rec.get(key)
            if value is not None and not isinstance(value, str):
                raise _bad_record(i, f"field {key!r} must be a string, got {type(value).__name__}")
            if value:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate ("\ud83d" in the JSON): no text can hold it
                    raise _bad_record(i, f"field {key!r} holds {value[e.start:e.end]!r} at character {e.start}, "
                                         "half of a UTF-16 surrogate pair (a broken escape in the source?), which is "
                                         "not text") from None
        if not (rec.get("output") or "").strip():
            dropped_empty += 1
            continue
        if not (rec["instruction"] or "").strip():
            raise _bad_record(i, "empty instruction")
        # an input of whitespace only is no input (format_example's template choice): the same example as ""
        inp = rec.get("input") if (rec.get("input") or "").strip() else ""
        key = (rec["instruction"], inp, rec["output"])
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        kept.append({"index": i, "instruction": rec["instruction"], "input": inp, "output": rec["output"]})
    if not kept:
        raise DataError(f"all {len(records)} records have an empty output")
    return kept, {"records_read": len(records), "dropped_empty_output": dropped_empty, "dropped_duplicates": repeats}


def format_example(rec: dict) -> dict:
    """Prompt (template with or without input) and completion (the output), for TRL's completion-only loss."""
    if rec["input"].strip():
        prompt = PROMPT_WITH_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    else:
        prompt = PROMPT_NO_INPUT.format(instruction=rec["instruction"])
    return {"index": rec["index"], "prompt": prompt, "completion": rec["output"]}


def split_records(records: list[dict], eval_size: float, fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed``; hold out ``eval_size`` (a share if < 1, else a count); keep ``fraction`` of the rest.

    The eval split does not depend on ``fraction``, so eval losses stay comparable across fractions.
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(eval_size * len(records))) if eval_size < 1 else int(eval_size)
    if n_eval < 1:
        raise DataError(f"dataset.eval_size={eval_size} leaves an empty eval split for {len(records)} records")
    if n_eval >= len(records):
        raise DataError(f"dataset.eval_size={eval_size} leaves no training records ({len(records)} records)")
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    n_train = max(1, int(round(fraction * len(train_idx))))
    train_idx = train_idx[:n_train]
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fingerprint(*paths: str | Path) -> str:
    """sha256 over the bytes of the prepared files, each preceded by its length (so that no record can move
    from the end of one file to the start of the next unnoticed): two runs with the same fingerprint saw the
    same data."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as f:  # in pieces: a local dataset of gigabytes is hashed at every workflow start
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def prepare(source: str, train_out: str | Path, eval_out: str | Path, summary_out: str | Path, *,
            split: str = "train", eval_size: float = 0.05, fraction: float = 1.0, seed: int = 42,
            revision: str | None = None, fields: dict | None = None) -> dict:
    """Load, check, format and split; write ``train.jsonl``, ``eval.jsonl`` and a summary JSON. ``fields``: the
    dataset's names for CodeAlpaca's fields (``dataset.fields``)."""
    raw = load_records(source, split, revision)
    try:
        kept, counts = check_records(map_fields(raw, fields))
    except DataError as e:  # the job's one-line message names the file (or hub dataset) the record is in
        if e.record is not None and str(source).lower().endswith(".jsonl"):  # and the record's line in the file
            lines = _jsonl_records(Path(source).read_text(encoding="utf-8-sig"))
            e = _bad_record(e.record, e.detail, next(itertools.islice(lines, e.record, None))[0])
        raise DataError(f"dataset.source = {str(source)!r}: {e}") from None
    if counts["dropped_empty_output"]:
        log.info("dropped %d record(s) with an empty output", counts["dropped_empty_output"])
    if counts["dropped_duplicates"]:
        log.info("dropped %d exact repeat(s) of a record kept before (one copy in each split would leak)",
                 counts["dropped_duplicates"])
    train_recs, eval_recs = split_records(kept, eval_size, fraction, seed)
    write_jsonl(train_out, [format_example(r) for r in train_recs])
    write_jsonl(eval_out, [format_example(r) for r in eval_recs])
    sha = fingerprint(train_out, eval_out)
    drop_stale_caches(train_out, eval_out, sha)
    summary = {
        "source": str(source),
        "revision": revision,
        "fields": fields or None,
        "commit": None if is_local_source(source) else hub_commit(source, revision, "dataset"),
        **counts,
        "records_kept": len(kept),
        "fraction": fraction,
        "eval_size": eval_size,
        "seed": seed,
        "train_examples": len(train_recs),
        "eval_examples": len(eval_recs),
        "with_input": sum(1 for r in kept if r["input"].strip()),
        "prompt_with_input": PROMPT_WITH_INPUT,
        "prompt_no_input": PROMPT_NO_INPUT,
        "fingerprint_sha256": sha,
    }
    Path(summary_out).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("prepared %d train and %d eval examples from %s", len(train_recs), len(eval_recs), source)
    return summary


CACHE_DIR = "cache"  # beside the prepared splits: results/data/cache/<the splits' fingerprint>


def cache_dir(train_path: str | Path, eval_path: str | Path, sha: str | None = None) -> Path:
    """Where the splits' tokenization is cached: a folder named after their content (``datasets`` itself knows a
    local file by its path and modification time only, so that splits rewritten with the same time stamp, as a
    copy that keeps time stamps leaves them, would load the old data and its tokenization)."""
    return Path(train_path).parent / CACHE_DIR / (sha or fingerprint(train_path, eval_path))[:16]


def drop_stale_caches(train_path: str | Path, eval_path: str | Path, sha: str | None = None) -> None:
    """Delete the caches of splits other than these (``sha``: their fingerprint, when known)."""
    import shutil

    root, keep = Path(train_path).parent / CACHE_DIR, cache_dir(train_path, eval_path, sha)
    for p in root.iterdir() if root.is_dir() else ():
        if p != keep and p.name != ".prepare.lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


class CacheDamaged(RuntimeError):
    """The splits' tokenization cache could not be read; it was deleted, and a new attempt tokenizes them again."""


def _unreadable_cache(e: BaseException, cache: Path) -> bool:
    """Whether ``e`` says a file of ``cache`` could not be read (Arrow's errors, and OSErrors about a file in it or
    about no file, as pyarrow raises for one cut short); not a full disk, a quota, a permission or the network."""
    import errno

    import pyarrow as pa

    if isinstance(e, pa.ArrowException):
        return True
    if not isinstance(e, OSError) or isinstance(e, ConnectionError) or e.errno in (
            errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        return False
    if type(e).__module__.split(".")[0] in ("requests", "urllib3", "httpx", "huggingface_hub"):
        return False
    name = getattr(e, "filename", None)
    if name:
        return Path(name).resolve().is_relative_to(cache.resolve())
    return e.errno is None  # pyarrow's own (ArrowIOError is OSError): "Expected to be able to read N bytes ..."


@contextlib.contextmanager
def damaged_cache_dropped(train_path: str | Path, eval_path: str | Path, sha: str | None = None):
    """Reading the splits through their cache (``load_splits``, TRL's tokenization): an Arrow file of it cut short
    or damaged (a full disk, a crash, a copy) failed every attempt with an error that named no folder, and
    ``--forcerun prepare_data`` kept the cache of identical splits. The cache is deleted and :class:`CacheDamaged`
    raised, which Snakemake's retry of the job answers in a fresh process by tokenizing again. Use it inside
    :func:`preparing_splits`, so that no other job is reading or writing the cache it deletes."""
    import shutil

    cache = cache_dir(train_path, eval_path, sha)
    try:
        yield
    except Exception as e:
        if not cache.is_dir() or not _unreadable_cache(e, cache):
            raise
        shutil.rmtree(cache, ignore_errors=True)
        raise CacheDamaged(f"the splits' tokenization cache {cache} could not be read ({type(e).__name__}: {e}); "
                           "it is deleted, and the next attempt tokenizes the splits again") from e


@contextlib.contextmanager
def preparing_splits(train_path: str | Path):
    """Held while a training job builds its trainer, where TRL prepares (tokenizes) the splits: one job at a time.

    Training jobs that start together (several on one GPU with ``training.jobs_per_gpu``, or one per GPU) would
    each tokenize the same splits before the first had written ``datasets``' cache; with this lock the first
    tokenizes and the others wait, then load its result from the cache. A lock file in the cache folder, taken
    with ``fcntl.flock`` (released by the system if the job dies); where the file system offers no locks, jobs go
    on without one, as before. Yields a dict filled on the way out: ``wait_s`` (waiting for another job),
    ``prep_s`` (the work itself) and ``tokenized`` (whether new files appeared in the cache: this job tokenized).
    """
    import time

    cache = Path(train_path).parent / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)  # the lock: one for the folder, whatever splits it caches
    info: dict = {"wait_s": 0.0, "prep_s": 0.0, "tokenized": False}
    t0 = time.perf_counter()
    with open(cache / ".prepare.lock", "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError) as e:  # no fcntl (Windows) or no locks on this file system (some NFS)
            log.info("no lock on %s (%s): concurrent jobs may each tokenize the splits", lock.name, e)
        info["wait_s"] = time.perf_counter() - t0
        if info["wait_s"] > 1:
            log.info("waited %.1fs for another job preparing the same splits", info["wait_s"])
        before = set(cache.rglob("*.arrow"))
        t1 = time.perf_counter()
        try:
            yield info
        finally:
            import datasets

            info["prep_s"] = time.perf_counter() - t1
            # with datasets' caching off every job tokenizes, in memory, and nothing new lands in the cache
            info["tokenized"] = bool(set(cache.rglob("*.arrow")) - before) or not datasets.is_caching_enabled()
    # closing the file releases the lock


def load_splits(train_path: str | Path, eval_path: str | Path, sha: str | None = None) -> tuple:
    """The prepared splits as Arrow-backed datasets with an on-disk cache beside them.

    Every transformation TRL's SFTTrainer applies (EOS, tokenization, labels, truncation) is a
    ``Dataset.map`` whose result ``datasets`` caches under a fingerprint of the input data, the function
    and its arguments (the tokenizer included). The first training job of a sweep tokenizes; every other
    run with the same tokenizer and ``max_length``, and every rerun, loads the cached result instead.
    The cache lives in ``results/data/cache/<fingerprint>`` (:func:`cache_dir`): splits with other content
    never load it, whatever their files' time stamps. ``sha``: the splits' fingerprint, when known.
    """
    from datasets import load_dataset

    cache = cache_dir(train_path, eval_path, sha)
    ds = load_dataset("json", data_files={"train": str(train_path), "eval": str(eval_path)}, cache_dir=str(cache))
    cols = ["prompt", "completion"]
    return ds["train"].select_columns(cols), ds["eval"].select_columns(cols)
