import json

import pytest

from lorasweep import data
from lorasweep.tiny import make_tiny_records


def rec(i, instruction="Do it.", inp="", output="done"):
    return {"instruction": instruction, "input": inp, "output": output}


def test_templates_with_and_without_input():
    with_input = data.format_example({"index": 0, "instruction": "Sort.", "input": "[3, 1]", "output": "[1, 3]"})
    assert with_input["prompt"].endswith("### Instruction:\nSort.\n\n### Input:\n[3, 1]\n\n### Response:\n")
    assert "paired with an input" in with_input["prompt"]
    assert with_input["completion"] == "[1, 3]"
    no_input = data.format_example({"index": 1, "instruction": "Say hi.", "input": "  ", "output": "hi"})
    assert "### Input" not in no_input["prompt"]
    assert no_input["prompt"].endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_empty_outputs_are_dropped_and_counted():
    records = [rec(0), rec(1, output=""), rec(2, output="   "), rec(3, output="done too")]
    kept, counts = data.check_records(records)
    assert [r["index"] for r in kept] == [0, 3]
    assert counts == {"records_read": 4, "dropped_empty_output": 2, "dropped_duplicates": 0}


def test_exact_repeats_are_dropped_so_that_no_example_is_in_both_splits(tmp_path):
    records = [rec(i, instruction=f"Task {i % 10}.", output=f"out {i % 10}") for i in range(40)]  # each 4 times
    records.append(rec(40, instruction="Task 1.", inp="x", output="out 1"))  # another input: another example
    kept, counts = data.check_records(records)
    assert counts["dropped_duplicates"] == 30 and [r["index"] for r in kept] == [*range(10), 40]
    src = tmp_path / "src.json"
    src.write_text(json.dumps(records))
    summary = data.prepare(str(src), tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "s.json", eval_size=3,
                           seed=0)
    train, evals = data.read_jsonl(tmp_path / "t.jsonl"), data.read_jsonl(tmp_path / "e.jsonl")
    assert summary["dropped_duplicates"] == 30 and len(train) + len(evals) == 11
    assert not {(r["prompt"], r["completion"]) for r in train} & {(r["prompt"], r["completion"]) for r in evals}


def test_a_repeat_whose_input_is_only_whitespace_is_a_repeat(tmp_path):
    # the template treats a whitespace-only input as none (format_example): both records make the same example
    records = [rec(0, instruction="Say hi.", output="hi"), rec(1, instruction="Say hi.", inp=" \n", output="hi"),
               rec(2, instruction="Say bye.", output="bye")]
    kept, counts = data.check_records(records)
    assert [r["index"] for r in kept] == [0, 2] and counts["dropped_duplicates"] == 1
    src = tmp_path / "src.json"
    src.write_text(json.dumps(records))
    summary = data.prepare(str(src), tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "s.json", eval_size=1,
                           seed=0)
    rows = data.read_jsonl(tmp_path / "t.jsonl") + data.read_jsonl(tmp_path / "e.jsonl")
    assert summary["dropped_duplicates"] == 1 and len(rows) == len({(r["prompt"], r["completion"]) for r in rows}) == 2


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "no records"),
        ([{"instruction": "x"}], r"record 0 \(0-based\): missing field 'output'"),
        ([rec(0), {"output": "y"}], r"record 1 \(0-based\): missing field 'instruction'"),
        ([rec(0), {"instruction": "x", "output": 3}], r"record 1 \(0-based\): field 'output' must be a string"),
        ([rec(0, output=""), rec(1, output="")], "all 2 records have an empty output"),
        (["text"], r"record 0 \(0-based\): expected an object"),
        ([rec(0), {"instruction": None, "output": "y"}], r"record 1 \(0-based\): empty instruction"),
        ([rec(0), json.loads('{"instruction": "x", "output": "a \\ud83d b"}')],
         r"record 1 \(0-based\): field 'output' holds '\\ud83d' at character 2, half of a UTF-16 surrogate pair"),
    ],
)
def test_bad_records_name_the_record(records, message):
    with pytest.raises(data.DataError, match=message):
        data.check_records(records)


def test_a_bad_record_is_named_so_that_it_can_be_found_in_the_file(tmp_path):
    """Errors named a record by its index from 0 without saying so: "record 2" in a JSON Lines file read as line 2,
    or the second record, and the record at fault was on line 4 (after a blank line). The index says it counts from
    0 (as json.load(f)[2], jq '.[2]' and datasets' ds[2] do), and a JSON Lines file's error names the line too."""
    rows = [rec(0), rec(1), {"instruction": "x", "output": 3}]
    jsonl, as_list = tmp_path / "mine.jsonl", tmp_path / "mine.json"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    as_list.write_text(json.dumps(rows, indent=1))
    with pytest.raises(data.DataError, match=r": record 2 \(0-based; line 4 of the file\): field 'output' must be"):
        data.prepare(str(jsonl), tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "s.json")
    assert json.loads(jsonl.read_text().split("\n")[3]) == rows[2]
    with pytest.raises(data.DataError, match=r": record 2 \(0-based\): field 'output' must be a string"):
        data.prepare(str(as_list), tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "s.json")
    assert json.loads(as_list.read_text())[2] == rows[2]


def test_split_is_seeded_and_eval_does_not_depend_on_fraction():
    records = [dict(rec(i), index=i) for i in range(200)]
    train_a, eval_a = data.split_records(records, eval_size=0.1, fraction=1.0, seed=7)
    train_b, eval_b = data.split_records(records, eval_size=0.1, fraction=0.5, seed=7)
    _, eval_c = data.split_records(records, eval_size=0.1, fraction=1.0, seed=8)
    assert len(eval_a) == 20 and len(train_a) == 180 and len(train_b) == 90
    assert eval_a == eval_b  # same held-out records whatever the fraction
    assert eval_a != eval_c  # and they do depend on the seed
    assert {r["index"] for r in train_b} <= {r["index"] for r in train_a}
    assert not {r["index"] for r in train_a} & {r["index"] for r in eval_a}
    train_n, eval_n = data.split_records(records, eval_size=25, fraction=1.0, seed=7)
    assert len(eval_n) == 25 and len(train_n) == 175


def test_split_errors_on_empty_eval():
    records = [dict(rec(i), index=i) for i in range(5)]
    with pytest.raises(data.DataError, match="empty eval split"):
        data.split_records(records, eval_size=0.01, fraction=1.0, seed=0)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_formats_load_the_same_records(tmp_path, suffix):
    import pandas as pd

    records = make_tiny_records(20, seed=1)
    records[0]["input"] = None  # missing values: null in JSON, null in parquet (which pandas reads as NaN)
    records[1]["output"] = None
    records[2]["output"] += " \u2028 line and paragraph separators \u2029 and NEL \x85 inside a string"
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".jsonl":  # as json.dumps writes with ensure_ascii=False: the separators unescaped
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        pd.DataFrame(records).to_parquet(path)
    assert data.load_records(str(path)) == records
    kept, counts = data.check_records(data.load_records(str(path)))
    assert counts["dropped_empty_output"] == sum(not (r["output"] or "").strip() for r in records)
    assert 1 not in {k["index"] for k in kept} and all(k["input"] is not None for k in kept)


def test_local_file_errors(tmp_path):
    with pytest.raises(data.DataError, match="file not found"):
        data.load_records(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(data.DataError, match="not valid JSON"):
        data.load_records(str(bad))
    obj = tmp_path / "obj.json"
    obj.write_text('{"instruction": "x"}')
    with pytest.raises(data.DataError, match="expected a list of records"):
        data.load_records(str(obj))
    # datasets' Dataset.to_json("x.json") writes JSON Lines: said so, not "Extra data at line 2"
    lines = tmp_path / "export.json"
    lines.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "z", "output": "w"}\n')
    with pytest.raises(data.DataError, match=r"export.json holds one JSON record per line \(JSON Lines, which "
                                             r"datasets' to_json writes\), not a JSON list: rename it to export.jsonl"):
        data.load_records(str(lines))
    bad.write_text('[{"instruction": "x", "output": "unterminated}]')  # a file cut short: where, in json's words
    with pytest.raises(data.DataError, match=r"is not valid JSON \(Unterminated string starting at: line 1 column 33\)"):
        data.load_records(str(bad))
    bad.write_text('[{"instruction": "x"}]\n[]')  # a list, then more: invalid JSON, not JSON Lines of records
    with pytest.raises(data.DataError, match="is not valid JSON"):
        data.load_records(str(bad))


def test_is_local_source():
    assert data.is_local_source("data/x.jsonl") and data.is_local_source("X.PARQUET")
    assert not data.is_local_source("sahil2801/CodeAlpaca-20k")


def test_tiny_dataset_is_deterministic_unique_and_has_two_empty_outputs():
    a, b = make_tiny_records(), make_tiny_records()
    assert a == b and len(a) == 400
    assert len({(r["instruction"], r["input"]) for r in a}) == 400
    assert sum(1 for r in a if not r["output"]) == 2


def test_prepare_real_codealpaca_sample(codealpaca_sample, tmp_path):
    out = {k: tmp_path / f"{k}.jsonl" for k in ("train", "eval")}
    summary = data.prepare(str(codealpaca_sample), out["train"], out["eval"], tmp_path / "s.json",
                           eval_size=0.05, fraction=0.5, seed=42)
    assert summary["records_read"] == 2017
    assert summary["dropped_empty_output"] == 2
    assert summary["eval_examples"] == round(0.05 * 2015)
    assert summary["train_examples"] == round(0.5 * (2015 - summary["eval_examples"]))
    rows = data.read_jsonl(out["train"])
    assert all(r["prompt"].endswith("### Response:\n") and r["completion"].strip() for r in rows)
    again = data.prepare(str(codealpaca_sample), tmp_path / "t2.jsonl", tmp_path / "e2.jsonl", tmp_path / "s2.json",
                         eval_size=0.05, fraction=0.5, seed=42)
    assert again["fingerprint_sha256"] == summary["fingerprint_sha256"]


def test_built_model_keeps_the_requested_shape_beyond_the_tokenizers_vocabulary(tmp_path):
    """build_tiny's shape keys (what config/opt-350m-shape.yaml uses) reach the saved model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasweep.tiny import build_tiny_model

    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in make_tiny_records(50)]
    path = build_tiny_model(texts, tmp_path / "m", vocab_size=400, hidden_size=32, num_layers=1, num_heads=2,
                            ffn_dim=64, word_embed_proj_dim=16, do_layer_norm_before=False, embedding_rows=600)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert len(tok) <= 400 < 600 == model.config.vocab_size
    assert tuple(model.get_input_embeddings().weight.shape) == (600, 16)  # 16-wide embeddings, projected to 32
    assert model.model.decoder.project_in is not None and model.config.do_layer_norm_before is False
    ids = tok("def f(x): return x", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_local_file_with_a_byte_order_mark_loads(tmp_path, suffix):
    records = make_tiny_records(5, seed=1)
    path = tmp_path / f"d{suffix}"
    text = json.dumps(records) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text, encoding="utf-8-sig")  # UTF-8 as Notepad and PowerShell save it: a BOM first
    assert data.load_records(str(path)) == records


def test_the_tiny_model_builds_on_a_split_whose_records_hold_line_separators(tmp_path):
    """The prepared splits hold U+2028, U+2029 and NEL unescaped (ensure_ascii=False); str.splitlines breaks there."""
    from transformers import AutoTokenizer

    from lorasweep.tiny import build_tiny_model_from_jsonl

    records = make_tiny_records(30, seed=1)
    records[0]["output"] += " \u2028 line \u2029 paragraph \x85 NEL"
    kept, _ = data.check_records(records)
    train = tmp_path / "train.jsonl"
    data.write_jsonl(train, [data.format_example(r) for r in kept])
    path = build_tiny_model_from_jsonl(train, tmp_path / "m", vocab_size=300, hidden_size=16, num_layers=1,
                                       num_heads=2, ffn_dim=16, max_positions=64)
    assert AutoTokenizer.from_pretrained(path)("\u2028")["input_ids"]


def test_one_job_at_a_time_prepares_the_splits_and_the_others_wait(tmp_path):
    """preparing_splits is a lock between processes: a second job that asks while the first holds it waits for it,
    and sees that it tokenized nothing (no new file in the cache), where the first did."""
    import subprocess
    import sys
    import time

    train = tmp_path / "train.jsonl"
    train.write_text("")
    waiter = ("import json, sys\nfrom lorasweep.data import preparing_splits\nprint('asking', flush=True)\n"
              "with preparing_splits(sys.argv[1]) as info:\n    pass\nprint(json.dumps(info))\n")
    with data.preparing_splits(train) as first:
        proc = subprocess.Popen([sys.executable, "-c", waiter, str(train)], stdout=subprocess.PIPE, text=True)
        # the other process has started and imported (however long that takes on a busy machine: a fixed sleep
        # from its start raced it) and asks for the lock now; it waits as long as this holds it
        assert proc.stdout.readline() == "asking\n"
        time.sleep(2)
        (tmp_path / data.CACHE_DIR / "cache-0.arrow").write_bytes(b"")  # what a tokenization leaves
    out, _ = proc.communicate(timeout=60)
    second = json.loads(out)
    assert first["tokenized"] and not second["tokenized"]
    assert second["wait_s"] > 1, second  # it waited for the first to finish


def test_with_datasets_caching_off_every_job_counts_as_tokenizing(tmp_path):
    import datasets

    datasets.disable_caching()
    try:
        with data.preparing_splits(tmp_path / "train.jsonl") as info:
            pass  # nothing lands in the cache: the work happened in memory
    finally:
        datasets.enable_caching()
    assert info["tokenized"]
    with data.preparing_splits(tmp_path / "train.jsonl") as info:
        pass
    assert not info["tokenized"]


def test_the_tokenization_cache_follows_the_splits_content_not_their_time_stamps(tmp_path):
    """datasets knows a local file by its path and modification time: splits prepared again with other content
    but the same time stamps (a copy that keeps them) must not load the old data from the cache."""
    import os

    src = tmp_path / "src.json"
    src.write_text(json.dumps([rec(i, instruction=f"Task {i}.", output=f"out {i}") for i in range(40)]))
    train, evals, summary = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "summary.json"
    data.prepare(str(src), train, evals, summary, eval_size=4, fraction=1.0, seed=0)
    stamps = {p: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (train, evals)}
    assert [len(s) for s in data.load_splits(train, evals)] == [36, 4]
    old_cache = data.cache_dir(train, evals)
    data.prepare(str(src), train, evals, summary, eval_size=4, fraction=0.25, seed=0)
    for p, (a, m) in stamps.items():
        os.utime(p, ns=(a, m))
    assert [len(s) for s in data.load_splits(train, evals)] == [9, 4]
    assert not old_cache.exists()  # preparing the splits again dropped the old splits' cache


def test_the_fingerprint_tells_which_file_a_record_is_in(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("x\ny\n"), b.write_text("z\n")
    split_one = data.fingerprint(a, b)
    a.write_text("x\n"), b.write_text("y\nz\n")
    assert data.fingerprint(a, b) != split_one


def test_an_eval_split_of_every_record_is_refused():  # D01
    records = [{"index": i, "instruction": f"T{i}", "input": "", "output": "o"} for i in range(5)]
    with pytest.raises(data.DataError, match="leaves no training records"):
        data.split_records(records, eval_size=5, fraction=1.0, seed=0)


def test_fraction_rounds_to_the_nearest_record():  # D05
    records = [{"index": i, "instruction": f"T{i}", "input": "", "output": "o"} for i in range(200)]
    train, _ = data.split_records(records, eval_size=20, fraction=0.333, seed=0)
    assert len(train) == 60  # 0.333 x 180 = 59.94


def test_only_an_unreadable_cache_file_counts_as_a_damaged_cache(tmp_path):
    """The tokenization cache is deleted (and the job retried) for what says a file of it could not be read, not
    for a full disk, a quota, a permission, the network or a missing split: deleting it would not help those."""
    import errno

    import pyarrow as pa

    from lorasweep.data import _unreadable_cache

    cache = tmp_path / "cache" / "abc"
    cache.mkdir(parents=True)
    assert _unreadable_cache(OSError("Expected to be able to read 104344 bytes for message body, got 1000"), cache)
    assert _unreadable_cache(pa.ArrowInvalid("not an Arrow file"), cache)
    assert _unreadable_cache(FileNotFoundError(errno.ENOENT, "gone", str(cache / "x" / "cache-1.arrow")), cache)
    assert not _unreadable_cache(FileNotFoundError(errno.ENOENT, "gone", str(tmp_path / "train.jsonl")), cache)
    assert not _unreadable_cache(OSError(errno.ENOSPC, "No space left on device"), cache)
    assert not _unreadable_cache(PermissionError(errno.EACCES, "denied", str(cache / "x")), cache)
    assert not _unreadable_cache(ConnectionError("hub unreachable"), cache)
    assert not _unreadable_cache(ValueError("a bug"), cache)


def test_a_hub_datasets_commit_is_read_from_the_hub_cache(tmp_path, monkeypatch):
    """prepare records which commit of a hub dataset it loaded (summary.json's ``commit``): load_dataset fetches the
    dataset's card through huggingface_hub, which writes the commit its revision resolved to under refs/."""
    from huggingface_hub import constants

    from lorasweep.provenance import hub_commit

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "datasets--sahil2801--CodeAlpaca-20k" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    (refs / "v2").write_text("b" * 40 + "\n")
    assert hub_commit("sahil2801/CodeAlpaca-20k", None, "dataset") == "a" * 40
    assert hub_commit("sahil2801/CodeAlpaca-20k", "v2", "dataset") == "b" * 40
    assert hub_commit("sahil2801/CodeAlpaca-20k", "c" * 40, "dataset") == "c" * 40  # a commit is its own
    assert hub_commit("sahil2801/CodeAlpaca-20k", "v3", "dataset") is None  # a revision never downloaded
    assert hub_commit("sahil2801/CodeAlpaca-20k", None, "model") is None  # a model's folder is another
    (refs / "main").write_text("")  # cut short
    assert hub_commit("sahil2801/CodeAlpaca-20k", None, "dataset") is None


@pytest.mark.parametrize("record, hint", [
    ({"prompt": "Add 1 and 2.", "response": "3"},
     r"name the dataset's own fields in dataset.fields \(\{instruction: prompt, output: response\}\)"),
    ({"question": "Add 1 and 2.", "answer": "3"}, r"name .* dataset.fields \(\{instruction: question, output: answer\}\)"),
    ({"instruction": "Add 1 and 2.", "answer": "3"}, r"name .* dataset.fields \(\{output: answer\}\)$"),
    ({"ask": "Add 1 and 2.", "say": "3"}, r"name .* dataset.fields, e.g. \{instruction: question, output: answer\}$"),
    ({"messages": [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "3"}]},
     r"chat records \(a list of messages\) are not read"),
    ({"text": "Add 1 and 2: 3"}, "a plain-text corpus, with no prompt and response to tell apart, is not read"),
])
def test_records_of_another_shape_name_the_file_and_what_to_rename(tmp_path, record, hint):
    """A dataset with other field names (prompt / response, question / answer, chat messages, plain text) stopped the
    data job with 'record 0: missing field ...' only: no file named, and nothing said of what lorasweep reads or
    that no setting maps field names."""
    src = tmp_path / "mine.jsonl"
    src.write_text(json.dumps(record) + "\n")
    with pytest.raises(data.DataError, match=rf"dataset.source = '{src}': record 0 \(0-based; line 1 of the file\): "
                                             "missing field .*lorasweep reads "
                                             f"CodeAlpaca-style records: 'instruction', 'output' and an optional "
                                             f"'input'; {hint}"):
        data.prepare(str(src), tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "s.json")


def test_dataset_fields_read_a_dataset_with_its_own_field_names_as_codealpacas(tmp_path):
    """dataset.fields maps CodeAlpaca's fields to the dataset's own names: the splits are those of the same records
    written with CodeAlpaca's names; a field not named keeps its own, input: null reads none; a mapped field a record
    lacks is named with its setting."""
    records = [rec(i, instruction=f"Add {i} and 1.", inp=str(i) if i % 3 else "", output=str(i + 1)) for i in range(30)]
    mine = [{"question": r["instruction"], "context": r["input"], "answer": r["output"], "id": i}
            for i, r in enumerate(records)]
    theirs, ours = tmp_path / "codealpaca.jsonl", tmp_path / "mine.jsonl"
    theirs.write_text("".join(json.dumps(r) + "\n" for r in records))
    ours.write_text("".join(json.dumps(r) + "\n" for r in mine))

    def prepared(src, fields, name):
        out = tmp_path / name
        out.mkdir()
        summary = data.prepare(str(src), out / "t.jsonl", out / "e.jsonl", out / "s.json", eval_size=5, seed=3,
                               fields=fields)
        return (out / "t.jsonl").read_text(), (out / "e.jsonl").read_text(), summary

    want = prepared(theirs, None, "a")
    got = prepared(ours, {"instruction": "question", "input": "context", "output": "answer"}, "b")
    assert got[:2] == want[:2] and want[2]["with_input"] > 0
    assert got[2]["fields"] == {"instruction": "question", "input": "context", "output": "answer"}
    assert want[2]["fields"] is None
    no_input = prepared(ours, {"instruction": "question", "input": None, "output": "answer"}, "c")
    assert no_input[2]["with_input"] == 0 and "### Input:" not in no_input[0] + no_input[1]
    same_names = [{"instruction": r["instruction"], "input": r["input"], "answer": r["output"]} for r in records]
    (tmp_path / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same_names))
    assert prepared(tmp_path / "half.jsonl", {"output": "answer"}, "d")[:2] == want[:2]  # the others keep theirs
    with pytest.raises(data.DataError, match=r"record 0 \(0-based; line 1 of the file\): dataset.fields.output = "
                                             r"'response', a field this record does not have \(fields: "
                                             r"\['answer', 'context', 'id', 'question'\]\)"):
        prepared(ours, {"instruction": "question", "output": "response"}, "e")


def test_a_hub_dataset_refusing_its_split_or_wanting_a_configuration_is_not_called_a_network_problem(tmp_path):
    """datasets refuses a split the dataset lacks, and a dataset of several configurations (subsets) named without
    one, with a ValueError: the data job called both a lack of network access and said to download the dataset.
    Read here from a folder in a hub repository's layout (datasets loads it as it loads a downloaded one)."""
    repo = tmp_path / "toy"
    for config in ("python", "js"):
        (repo / config).mkdir(parents=True)
        (repo / config / "train-00000-of-00001.jsonl").write_text(json.dumps(rec(0)) + "\n")
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n" for c in ("python", "js"))
        + "---\n")
    with pytest.raises(data.DataError, match=r"could not load hub dataset .*, split 'train' \(ValueError: Config name "
                                             r"is missing.*Set dataset.split to a split it has; a dataset of several "
                                             r"configurations \(subsets\) cannot be named") as e:
        data.load_records(str(repo), split="train")
    assert "network" not in str(e.value)
    (repo / "README.md").unlink()
    (repo / "js" / "train-00000-of-00001.jsonl").unlink()
    with pytest.raises(data.DataError, match=r"split 'validation' \(ValueError: Unknown split \"validation\".*Set "
                                             r"dataset.split to a split it has"):
        data.load_records(str(repo), split="validation")
