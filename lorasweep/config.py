"""Configuration: schema validation with readable errors, and expansion into one spec per run.

A run spec holds only what affects that run's training, so that Snakemake's params rerun trigger
retrains a run only when one of *its* settings changes.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """The configuration is invalid; the message names each offending key."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def _key(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _number_as_text_hint(value) -> str:
    """Why a number arrived as text: quoted or written like 1e-3 in a config file, or nested in ``--config``
    (Snakemake reads a value like ``training={epochs: 1}`` with YAML's BaseLoader, all text)."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return (f" (YAML reads {value} as text: write numbers unquoted, with a decimal point before an exponent, e.g. "
            "1.0e-3; --config passes a nested or list value such as training={epochs: 1} as text: set it in a file "
            "given with --configfile)")


def _key_paths(schema: dict, path: tuple = ()):
    """``(key path, name)`` of every key of the schema (not those of a ranks entry)."""
    for name, sub in schema.get("properties", {}).items():
        yield ".".join((*path, name)), name
        yield from _key_paths(sub, (*path, name))


def _describe(error) -> str:
    """One line per error: the key, the value found and what is allowed."""
    key = _key(error.absolute_path)
    v, schema = error.validator, error.schema
    if v == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        prefix = f"{key}." if error.absolute_path else ""
        import difflib

        close = {e: m[0] for e in extra if (m := difflib.get_close_matches(str(e), allowed, n=1, cutoff=0.8))}
        # QLoRA runs take no init, in methods.qlora or a ranks entry (methods.lora.init does not apply to them either)
        qlora_init = (key == "methods.qlora" or key.startswith("methods.qlora.ranks[")) and "init" in extra
        # a key of another section written here (batch_size at the top level, training.learning_rate)
        elsewhere = {e: [p for p, name in _key_paths(load_schema()) if name == e and p != prefix + e]
                     for e in extra if e not in close and not (qlora_init and e == "init")}
        elsewhere = {e: paths for e, paths in elsewhere.items() if paths}
        if not error.absolute_path and len(close) + len(elsewhere) < len(extra):
            # top-level keys like nothing in the schema (a metrics.json's "run", "eval_loss", ...; its "method"
            # is close to "methods"): a file that is not a config
            hint = (" (--configfile reads every file after it: a target or other argument written after it, e.g. "
                    "results/metrics.csv, is read as a config file; put targets before --configfile)")
        elif close or elsewhere:  # a misspelt or misplaced key
            hint = " (did you mean " + ", ".join(
                [f"{prefix}{m} for {prefix}{e}" for e, m in close.items()]
                + [f"{' or '.join(paths)} for {prefix}{e}" for e, paths in elsewhere.items()]) + "?)"
        else:
            hint = ""
        if qlora_init:
            hint += " (QLoRA runs use the default init: olora / pissa have no 4-bit form)"
        return f"unknown key(s) {', '.join(prefix + e for e in extra)}; allowed here: {', '.join(allowed)}{hint}"
    if v == "enum":
        return f"{key} = {error.instance!r}: must be one of {', '.join(map(repr, schema['enum']))}"
    if v == "oneOf" and "target_modules" in key:
        return f"{key} = {error.instance!r}: must be a list of module names, 'attention' or 'all-linear'"
    if v == "oneOf" and ".ranks[" in key and isinstance(error.instance, dict) and error.context:
        # an entry {rank, ...}: what is wrong inside it, by key (the errors against the entry's object form)
        return "\n  - ".join(_describe(e) for e in _without_duplicates(
            [e for e in error.context if e.relative_schema_path[0] == 1]))
    if v == "oneOf" and ".ranks[" in key:
        return (f"{key} = {error.instance!r}: must be a rank (integer >= 1) or {{rank, "
                + ("" if key.startswith("methods.qlora") else "init: default|olora|pissa, ")
                + "use_rslora: bool, use_dora: bool}" + _number_as_text_hint(error.instance))
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"{key} = {error.instance!r}: must be {op} {error.validator_value}"
    if v == "type":
        hint = ""
        if "number" in str(error.validator_value) or "integer" in str(error.validator_value):
            hint = _number_as_text_hint(error.instance)
        if isinstance(error.instance, float) and "integer" in str(error.validator_value):
            hint = f" (a whole number, written without a decimal point: {error.instance:.0f})" \
                if error.instance.is_integer() else ""
        if isinstance(error.instance, bool) and "enabled" in schema.get("properties", {}):
            hint = f" (to switch it {'on' if error.instance else 'off'}: {key}.enabled: {str(error.instance).lower()})"
        types = error.validator_value
        return f"{key} = {error.instance!r}: must be of type {' or '.join(types) if isinstance(types, list) else types}{hint}"
    if v == "required":
        hint = ""
        if not error.absolute_path:
            hint = (" (Snakemake merges --configfile files over config/config.yaml in the working directory; run "
                    "from the repository root, or pass the base too: --configfile path/to/config/config.yaml "
                    "your-overrides.yaml)")
        return f"{key}: {error.message}{hint}"
    if v == "not" and "max_steps" in key:
        return f"{key} = 0: must be -1 (train for `epochs`) or a positive number of steps"
    return f"{key} = {error.instance!r}: {error.message}"


def _without_duplicates(errors: list) -> list:
    """``errors`` less a key's type error where its enum error says more (``device: null``: one of 'cuda', ...)."""
    enums = {tuple(e.absolute_path) for e in errors if e.validator == "enum"}
    return [e for e in errors if not (e.validator == "type" and tuple(e.absolute_path) in enums)]


def validate_config(config: dict) -> dict:
    """Check ``config`` against the schema, filling defaults in place; raise ConfigError naming every bad key."""
    import jsonschema

    schema = load_schema()
    # JSON Schema counts 8.0 as an integer; a rank, seed or batch size of 8.0 would name runs "seed42.0" and
    # reach the trainer as a float: whole numbers must be written as such
    whole = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool))
    validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=whole)(schema)
    errors = _without_duplicates(sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise ConfigError(f"invalid lorasweep configuration:\n{lines}\n(schema: {SCHEMA_PATH})")
    _fill_defaults(config, schema)
    try:
        table = runs(config)
    except ConfigError as e:  # duplicate run names, unsupported option combinations
        raise ConfigError(f"invalid lorasweep configuration:\n  - {e}") from None
    if not table:
        raise ConfigError("invalid lorasweep configuration: no runs enabled (methods.full.enabled is false "
                          "and methods.lora.ranks and methods.qlora.ranks are empty)")
    training = config.get("training", {})
    eval_size = (config.get("dataset") or {}).get("eval_size")
    if isinstance(eval_size, float) and eval_size >= 1 and not eval_size.is_integer():
        raise ConfigError(f"invalid lorasweep configuration: dataset.eval_size = {eval_size}: a share below 1 "
                          "(0.05) or a whole number of records (100)")
    tiny = (config.get("model") or {}).get("build_tiny")
    if tiny:  # what building the model would stop on, said before any job runs
        if tiny["hidden_size"] % tiny["num_heads"]:
            raise ConfigError(f"invalid lorasweep configuration: model.build_tiny.hidden_size = {tiny['hidden_size']} "
                              f"must be a multiple of model.build_tiny.num_heads = {tiny['num_heads']}")
        if training.get("max_length", 0) > tiny["max_positions"]:
            raise ConfigError(f"invalid lorasweep configuration: training.max_length = {training['max_length']} is "
                              f"above model.build_tiny.max_positions = {tiny['max_positions']}, the longest "
                              "sequence the built model has positions for")
        where = Path(str(config["model"]["name_or_path"]))
        if (where.is_absolute() or where.parts[:1] != ("results",) or ".." in where.parts or len(where.parts) < 2
                or where.parts[1] in ("data", "runs", "benchmarks")):  # the workflow's own outputs live there
            # Snakemake deletes a directory output before its rule writes it: a user's own model directory
            # named here would be replaced by a random tiny model, and a hub id would name one
            raise ConfigError(
                f"invalid lorasweep configuration: model.name_or_path = {str(where)!r} with model.build_tiny set: "
                "the workflow would build a randomly initialised tiny model there (deleting what the directory "
                "holds) and report it under that name. To train that model, set model.build_tiny: null (e.g. "
                "`model: {name_or_path: ..., build_tiny: null}` in your override file); to move the built model, "
                "name a folder of its own under results/ (the preset's: results/tiny/opt-tiny; not results/data, "
                "results/runs or results/benchmarks, which the workflow writes)")
    if training.get("device") == "cpu" and training.get("precision") == "fp16":  # the training job would stop on it
        raise ConfigError("invalid lorasweep configuration: training.precision = 'fp16' is not supported with "
                          "training.device = 'cpu': use 'fp32', 'bf16' or 'auto' (fp32 on the CPU)")
    if training.get("torch_compile_regional") and training.get("torch_compile") in (False, None):
        raise ConfigError("invalid lorasweep configuration: training.torch_compile_regional = true needs "
                          "training.torch_compile (true or a mode: it picks the mode, regional the scope)")
    return config


def check_dataset_file(config: dict, built: tuple[str, ...] = ()) -> None:
    """A local dataset (``dataset.source`` ending in .json / .jsonl / .parquet) must exist, unless a rule builds
    it (``built``): Snakemake would otherwise skip a finished sweep's data step without a word, or stop with a
    missing-input error that does not name the key. A local file of another format (.csv) would be read as a hub
    id, and fail in the data job as a hub dataset that could not be loaded."""
    from .data import is_local_source

    source = str(config["dataset"]["source"])
    if Path(source).is_dir():  # datasets would read the files it holds, but the workflow could not follow them
        found = sorted(p.name for p in Path(source).rglob("*") if p.is_file() and is_local_source(p.name))
        raise ConfigError(f"dataset.source = {source!r} is a folder: name the data file in it ("
                          + (", ".join(found[:5]) if found else "none found: a .json, .jsonl or .parquet file") + ")")
    if config["dataset"].get("revision") and is_local_source(source):
        raise ConfigError(f"dataset.revision = {config['dataset']['revision']!r} is for a hub dataset; "
                          f"dataset.source = {source!r} is a local file: remove dataset.revision")
    if not is_local_source(source) and Path(source).is_file():
        raise ConfigError(f"dataset.source = {source!r}: a local file of a format lorasweep does not read; convert it "
                          "to .json (a list of records), .jsonl or .parquet with instruction / input / output fields")
    if is_local_source(source) and source not in built and not Path(source).is_file():
        raise ConfigError(f"dataset.source = {source!r}: file not found (read from the working directory "
                          f"{Path.cwd()}); a local .json / .jsonl / .parquet in CodeAlpaca's format, or a Hugging "
                          "Face dataset id")


def check_model_path(config: dict) -> None:
    """``model.name_or_path`` written as a path (``/...``, ``./...``, ``../...``, ``~...``) must be a folder, unless a
    rule builds it: otherwise it would be read as a hub id, and the first training job would fail after the data
    step (or wait on the network) with an error about repository names. ``model.revision`` is a hub model's."""
    model = config["model"]
    name = str(model["name_or_path"])
    if model.get("build_tiny"):
        return
    if name.startswith("~"):
        raise ConfigError(f"model.name_or_path = {name!r}: write the path out ({str(Path(name).expanduser())!r}); "
                          "a ~ is not expanded, and the name would be read as a hub id")
    local = Path(name)
    if name.startswith(("/", "./", "../")) and not local.is_dir():
        raise ConfigError(f"model.name_or_path = {name!r}: " + ("a file, not a model folder" if local.exists() else
                          f"folder not found (read from the working directory {Path.cwd()})") +
                          "; a folder saved with save_pretrained, or a Hugging Face hub id such as facebook/opt-350m")
    if model.get("revision") and local.is_dir():
        raise ConfigError(f"model.revision = {model['revision']!r} is for a hub model; model.name_or_path = {name!r} "
                          "is a local folder: remove model.revision")
    _check_hub_id(name)


def _check_hub_id(name: str) -> None:
    """``model.name_or_path`` that is not a local folder must be a valid hub id: ``models/opt/350m`` (a relative path
    to a folder not there) or a name with a space would fail in the first training job, after the data step, or (with
    HF_HUB_OFFLINE=1) in the cache lookup with huggingface_hub's HFValidationError, naming no key."""
    if Path(name).is_dir():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ConfigError(f"model.name_or_path = {name!r}: not a folder (read from the working directory {Path.cwd()}) "
                          f"nor a Hugging Face hub id ({e}); a folder saved with save_pretrained, or a hub id such as "
                          "facebook/opt-350m") from None


def hub_offline() -> str:
    """The setting that forbids the Hugging Face libraries to download (``HF_HUB_OFFLINE=1``), or "" when none does.
    As huggingface_hub reads it: ``HF_HUB_OFFLINE``, or where that is unset or empty, ``TRANSFORMERS_OFFLINE``."""
    name = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    value = os.environ.get(name, "")
    return f"{name}={value}" if value.upper() in ("1", "ON", "YES", "TRUE") else ""


def check_jobs_import(checkout: str | Path, python: str = sys.executable, search_path=()) -> None:
    """The workflow's jobs must import lorasweep from ``checkout``, the one holding the Snakefile. A job's script
    (``python`` with its own folder first on ``sys.path``) finds it as Python does: ``PYTHONPATH``, then the
    environment's site-packages (a package installed there, or an editable install that adds a path), and only after
    them ``search_path``, the directories Snakemake appends to every script's ``sys.path`` (its reading process's
    ``sys.path``, the Snakefile's folder included; ``snakemake.common.get_snakemake_searchpaths``), then an editable
    install's import hook. So lorasweep not installed, or installed editable (as the README does) from another
    checkout, is fine: the job finds this checkout. One on ``PYTHONPATH`` or installed without ``-e`` (and pulled
    since) would run other code than the one the workflow validated and tracks: that stops the workflow before any
    job, saying what to do."""
    want = (Path(checkout) / "lorasweep" / "__init__.py").resolve()
    fix = (f"install this checkout into the environment (pip install -e {str(checkout)!r}), or put it first on "
           f"PYTHONPATH for the run (PYTHONPATH={str(checkout)!r} snakemake ...)")
    # as a job's script finds it: sys.path without the script's own folder (here -c's ""), Snakemake's appended
    probe = ("import sys, importlib.util as u; sys.path.pop(0); sys.path.extend(sys.argv[1:]); "
             "s = u.find_spec('lorasweep'); print(s.origin if s else '')")
    found = subprocess.run([python, "-c", probe, *map(str, search_path)], capture_output=True,
                           text=True).stdout.strip()
    if found and Path(found).resolve() == want:
        return
    if not found:
        raise ConfigError(f"lorasweep is not installed in this environment ({python}): every job would fail at its "
                          f"import; {fix}")
    raise ConfigError(f"this environment's jobs would import lorasweep from {Path(found).parent}, not from this "
                      f"workflow's checkout {checkout}: they would run that code, while the workflow checked and "
                      f"tracks this one's; {fix}")


def check_offline_model_cached(config: dict) -> None:
    """With ``HF_HUB_OFFLINE`` set, a hub model must be in the local Hugging Face cache: otherwise every training
    job would fail at its start, after the data step (the workflow's main process checks, before any job)."""
    model = config["model"]
    name = str(model["name_or_path"])
    offline = hub_offline()
    if model.get("build_tiny") or Path(name).is_dir() or not offline:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    _check_hub_id(name)
    if not isinstance(try_to_load_from_cache(name, "config.json", revision=model.get("revision")), str):
        at = f" at revision {model['revision']!r}" if model.get("revision") else ""
        raise ConfigError(f"model.name_or_path = {name!r}{at} is not in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}), and {offline} forbids downloading it: download it where "
                          "there is network (`hf download <id>` fills the cache; `--local-dir DIR` makes a folder to "
                          "point model.name_or_path at), or point HF_HOME / HF_HUB_CACHE at the cache that holds it")


def _fill_defaults(instance: dict, schema: dict) -> None:
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(name), dict) and sub.get("properties"):
            _fill_defaults(instance[name], sub)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _repeated_keys(node, path: str = "", read: set | None = None):
    """``(key path, first line, repeated line)`` of every key written twice in one mapping under a YAML ``node``."""
    read = set() if read is None else read
    if id(node) in read:  # an alias of a node read already (once; one that holds its own alias, without end)
        return
    read.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for k, v in node.value:
            name = f"{path}.{k.value}" if path else str(k.value)
            if k.value in seen:
                yield name, seen[k.value], k.start_mark.line + 1
            seen.setdefault(k.value, k.start_mark.line + 1)
            yield from _repeated_keys(v, name, read)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _repeated_keys(v, f"{path}[{i}]", read)


def check_config_files(paths) -> None:
    """No key written twice in a config file: YAML (and Snakemake) keep the last one, so a second ``training:`` section
    in an override file would drop every setting of the first without a word, leaving them at their defaults."""
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")  # as Snakemake reads it, whatever the locale
        if "__use_yte__" in text:  # a YTE template (Snakemake renders it): its keys may repeat
            continue
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:  # Snakemake says so itself, unless it is JSON (read first) indented with tabs
            try:
                json.loads(text)  # strict: a tab in valid JSON is whitespace between tokens, never in a string
                node = yaml.compose(text.replace("\t", " "), Loader=yaml.SafeLoader)  # same lines
            except (ValueError, yaml.YAMLError):
                continue
        repeated = list(_repeated_keys(node))
        if repeated:
            raise ConfigError(f"invalid lorasweep configuration: {path}: " + "; ".join(
                f"{key} is written twice (lines {a} and {b})" for key, a, b in repeated)
                + ": YAML keeps only the last, and the settings under the first would be dropped without a word; "
                "merge them into one")


def load_config(*paths: str | Path) -> dict:
    """Read and deep-merge YAML files in order (as ``--configfile a.yaml b.yaml`` does), then validate."""
    check_config_files(paths)
    config: dict = {}
    for p in paths:
        config = deep_merge(config, yaml.safe_load(Path(p).read_text(encoding="utf-8")) or {})
    return validate_config(config)


ADAPTER_DEFAULTS = {"init": "default", "use_rslora": False, "use_dora": False}


def _variant_suffix(v: dict) -> str:
    """The part of a run name that says how an adapter run differs from the defaults: -olora, -rslora, -dora."""
    return (f"-{v['init']}" if v["init"] != "default" else "") + ("-rslora" if v["use_rslora"] else "") + \
        ("-dora" if v["use_dora"] else "")


def runs(config: dict) -> dict[str, dict]:
    """Every run of the configuration, by name, in order: full, then LoRA entries, then QLoRA entries.

    A value holds the method, rank and adapter options (init, use_rslora, use_dora) of the run. A ranks entry
    is a rank (the method's defaults apply) or a dict with its own options; the name says what differs from
    PEFT's defaults: ``lora-r128``, ``lora-r128-olora``, ``qlora-r8-dora``.
    """
    methods = config.get("methods", {})
    out: dict[str, dict] = {}
    if methods.get("full", {}).get("enabled", True):
        out["full"] = {"method": "full", "rank": None}
    for method in ("lora", "qlora"):
        m = methods.get(method, {})
        # QLoRA's entries take methods.lora's scaling and DoRA settings too (qlora-rN against lora-rN then
        # differs by the 4-bit base alone); an init from the base's weights (olora, pissa) has no 4-bit form
        lora = methods.get("lora", {})
        defaults = {k: lora.get(k, d) for k, d in ADAPTER_DEFAULTS.items()}
        if method == "qlora":
            defaults["init"] = "default"
        for i, entry in enumerate(m.get("ranks", [])):
            v = {**defaults, **({"rank": entry} if isinstance(entry, int) else entry)}
            if v["use_dora"] and v["init"] != "default":
                def where(k):  # the entry's own setting, or methods.lora's
                    return f"methods.{method}.ranks[{i}].{k}" if isinstance(entry, dict) and k in entry \
                        else f"methods.lora.{k}"
                raise ConfigError(f"methods.{method}.ranks[{i}]: init {v['init']!r} ({where('init')}) cannot be "
                                  f"combined with use_dora ({where('use_dora')}) (PEFT cannot convert a DoRA adapter "
                                  "back to the original base model)")
            name = f"{method}-r{v['rank']}{_variant_suffix(v)}"
            if name in out:
                raise ConfigError(f"methods.{method}.ranks[{i}]: run {name!r} is listed twice")
            out[name] = {"method": method, **v}
    return out


def run_names(config: dict) -> list[str]:
    """``full``, then one name per LoRA and QLoRA entry (see :func:`runs`), in that order."""
    return list(runs(config))


def seeds(config: dict) -> list[int]:
    """The training seeds: ``seeds`` when set, else ``[seed]``."""
    return list(config.get("seeds") or [config.get("seed", 42)])


def parse_run(name: str) -> tuple[str, int | None]:
    """``'lora-r128'`` -> ``('lora', 128)``; ``'lora-r128-olora'`` -> ``('lora', 128)``; ``'full'`` -> ``('full', None)``."""
    if name == "full":
        return "full", None
    method, _, rest = name.partition("-r")
    rank = rest.split("-", 1)[0]
    if method not in ("lora", "qlora") or not rank.isdigit():
        raise ConfigError(f"not a run name: {name!r} (expected full, lora-r<rank>[-options] or qlora-r<rank>[-options])")
    return method, int(rank)


def variant(name: str) -> str:
    """What a run name says of its adapter options beyond the method and rank: ``'rslora-dora'`` for
    ``lora-r8-rslora-dora``, ``''`` for a plain run (and for full)."""
    return name.split("-", 2)[2] if name.count("-") > 1 else ""


def is_plain(name: str) -> bool:
    """True for full and for adapter runs with PEFT's default options (the runs rank trends compare)."""
    return not variant(name)


# Settings that change how a run is executed, never what it computes (beyond floating-point rounding): kept
# out of the run spec, so that changing them does not make Snakemake retrain finished runs (its params
# trigger compares the spec). Each run's metrics record the values it ran with.
# eval_batch_size: every example's loss is summed over its own tokens (scoring.py), so the batch it is scored in
# moves nothing but rounding, the evaluation's memory and its time (README's advice after an evaluation runs out
# of memory is to lower it: that must not retrain the finished runs).
OPERATIONAL_KEYS = ("checkpoint_steps", "checkpoint_min_interval_s", "keep_checkpoints", "threads", "torch_compile",
                    "torch_compile_regional", "pad_to_multiple_of", "jobs_per_gpu", "cudnn_attention",
                    "frozen_weights_16bit", "eval_batch_size")


def operational(config: dict | None = None) -> dict:
    """The operational training settings of ``config``; without one, the schema's defaults."""
    if config is None:
        props = load_schema()["properties"]["training"]["properties"]
        return {k: props[k]["default"] for k in OPERATIONAL_KEYS}
    return {k: config["training"][k] for k in OPERATIONAL_KEYS}


def run_spec(config: dict, name: str, seed: int | None = None) -> dict:
    """Everything that determines one run's training (for one training seed), and nothing else."""
    table = runs(config)
    if name not in table:
        raise ConfigError(f"run {name!r} is not in this configuration; runs: {', '.join(table)}")
    if seed is None:
        seed = seeds(config)[0]
    run = table[name]
    method, rank = run["method"], run["rank"]
    methods = config["methods"]
    spec = {
        "run": name,
        "method": method,
        "rank": rank,
        "seed": seed,
        "model": {k: config["model"].get(k) for k in ("name_or_path", "revision", "trust_remote_code")},
        "training": {k: copy.deepcopy(v) for k, v in config["training"].items() if k not in OPERATIONAL_KEYS},
        "learning_rate": methods[method]["learning_rate"],
        "lora": None,
        "quantization": None,
    }
    if method in ("lora", "qlora"):
        lora = methods["lora"]
        targets = lora["target_modules"]
        spec["lora"] = {
            "r": rank,
            "alpha": lora["alpha"] if lora.get("alpha") is not None else lora["alpha_per_rank"] * rank,
            "dropout": lora["dropout"],
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "init": run["init"],
            "use_rslora": run["use_rslora"],
            "use_dora": run["use_dora"],
        }
    if method == "qlora":
        q = methods["qlora"]
        spec["quantization"] = {"bits": 4, "quant_type": q["quant_type"], "double_quant": q["double_quant"]}
    return spec


# A run spec's settings besides its training keys, flattened: the same names for every run of every config, so that
# a run's recorded settings do not change when other runs come or go (a full run's lora.* read null).
SPEC_SETTINGS = ("run", "method", "rank", "seed", "learning_rate", "model.name_or_path", "model.revision",
                 "model.trust_remote_code",
                 "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.init", "lora.use_rslora",
                 "lora.use_dora", "quantization.bits", "quantization.quant_type", "quantization.double_quant")


def setting_names() -> list[str]:
    """Every setting a run spec holds, flattened (``training.max_length``, ``lora.r``, ...): the schema's training
    keys that are not operational, and :data:`SPEC_SETTINGS`."""
    return list(_setting_names())


@functools.cache
def _setting_names() -> tuple[str, ...]:  # the schema read once, not once per run and job
    props = load_schema()["properties"]["training"]["properties"]
    return (*SPEC_SETTINGS, *(f"training.{k}" for k in props if k not in OPERATIONAL_KEYS))


def flat_settings(spec: dict) -> dict:
    """``spec`` as ``{setting name: value}`` over :func:`setting_names` (``None`` for what the run does not have).

    The workflow gives Snakemake one ``name=value`` parameter per setting rather than the spec as one value, so
    that a job's rerun reason names the setting that changed, its value before and now."""
    flat: dict = {}
    for key, value in spec.items():
        if key in ("model", "training", "lora", "quantization"):
            flat.update({f"{key}.{k}": v for k, v in (value or {}).items()})
        else:
            flat[key] = value
    names = setting_names()
    unknown = sorted(set(flat) - set(names))
    if unknown:  # a setting outside the list would escape Snakemake's params trigger
        raise ConfigError(f"run spec settings without a rerun parameter: {', '.join(unknown)} (SPEC_SETTINGS)")
    return {n: flat.get(n) for n in names}


# settings added after sweeps had been trained: recorded only once set, so that their arrival retrains nothing
UNRECORDED_WHEN_UNSET = ("model.revision",)


class Unrecorded:
    """The Snakemake param of a setting in :data:`UNRECORDED_WHEN_UNSET` left unset: a value Snakemake cannot
    represent, which its params trigger leaves out (it compares the set of the params' reprs, names aside), so that
    the finished runs of a sweep trained before the setting existed stay finished. All are equal."""

    def __eq__(self, other) -> bool:
        return isinstance(other, Unrecorded)

    def __hash__(self) -> int:
        return hash(Unrecorded)

    def __repr__(self) -> str:
        return "Unrecorded()"


def setting_param(name: str, value):
    """One setting as the workflow's Snakemake param: ``learning_rate=0.0002`` (:class:`Unrecorded` for a setting
    of :data:`UNRECORDED_WHEN_UNSET` left unset)."""
    if value is None and name in UNRECORDED_WHEN_UNSET:
        return Unrecorded()
    return f"{name}={json.dumps(value)}"


def job_spec(smk) -> dict:
    """The run spec of a Snakemake job of one run and seed (``smk``: a script's ``snakemake`` object): the rule
    passes its settings as params for the rerun trigger (:func:`flat_settings`, ``setting_*``); the script computes
    the spec from the validated config and the job's wildcards, as those params were, and checks that it finds the
    same settings (a script importing another lorasweep than the Snakefile's would train other settings than the
    workflow records)."""
    spec = run_spec(smk.config, smk.wildcards.run, int(smk.wildcards.seed))
    given = {v for k, v in smk.params.items() if k.startswith("setting_")}
    expected = {setting_param(n, v) for n, v in flat_settings(spec).items()}
    if given and given != expected:
        raise ConfigError("this job's run settings differ from those the workflow recorded ("
                          + ", ".join(sorted(map(str, given ^ expected))[:6]) + "): the script imports another lorasweep than "
                          "the Snakefile's? Install this checkout (pip install -e .) in the environment you run")
    return spec
