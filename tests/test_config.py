import copy
import re

import pytest
import yaml

from conftest import REPO
from lorasweep.config import ConfigError, load_config, run_names, run_spec, validate_config

MINIMAL = {"model": {"name_or_path": "facebook/opt-350m"}, "dataset": {"source": "sahil2801/CodeAlpaca-20k"}}


def test_defaults_are_filled():
    cfg = validate_config(copy.deepcopy(MINIMAL))
    assert cfg["methods"]["lora"]["ranks"] == [8, 128, 256]
    assert cfg["methods"]["lora"]["target_modules"] == "attention"  # OPT: q_proj, k_proj, v_proj (lorasweep.presets)
    assert cfg["methods"]["qlora"]["quant_type"] == "nf4"
    assert cfg["training"]["device"] == "cuda"
    assert run_names(cfg) == ["full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"]


def test_default_config_file_is_the_writeups_experiment():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert cfg["model"]["name_or_path"] == "facebook/opt-350m"
    assert cfg["dataset"]["source"] == "sahil2801/CodeAlpaca-20k"
    assert run_names(cfg) == ["full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"]
    spec = run_spec(cfg, "lora-r128")
    assert spec["lora"] == {"r": 128, "alpha": 512, "dropout": 0.1, "target_modules": "attention", "init": "default",
                            "use_rslora": False, "use_dora": False}
    q8, l8 = run_spec(cfg, "qlora-r8"), run_spec(cfg, "lora-r8")
    assert q8["lora"] == l8["lora"] and q8["quantization"]["quant_type"] == "nf4" and l8["quantization"] is None


def _schema_keys(node: dict, prefix: str = "") -> dict:
    """Every key of the schema as its dotted path, with its schema entry."""
    out = {}
    for key, entry in (node.get("properties") or {}).items():
        out[prefix + key] = entry
        if "properties" in entry:
            out.update(_schema_keys(entry, f"{prefix}{key}."))
    return out


def test_config_yaml_shows_every_schema_key_at_its_default():
    """config/config.yaml documents every key (README, the schema's description), at the schema's default: the
    keys a preset leaves out take what config.yaml says. Keys added to the schema were missing there before
    (training.threads, model.build_tiny, training.cudnn_attention)."""
    schema = yaml.safe_load((REPO / "lorasweep" / "config.schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    shape = yaml.safe_load((REPO / "config" / "opt-350m-shape.yaml").read_text())["model"]["build_tiny"]
    for path, entry in _schema_keys(schema).items():
        if path.startswith(("model.build_tiny.", "dataset.fields.")):
            continue
        value = config
        for part in path.split("."):
            assert isinstance(value, dict) and part in value, f"{path} is not in config/config.yaml"
            value = value[part]
        if "default" in entry and "properties" not in entry and path != "experiment":
            assert value == entry["default"], f"{path}: config/config.yaml has {value!r}, the schema {entry['default']!r}"
    # config.yaml's comment on build_tiny: all its keys are shown in config/opt-350m-shape.yaml
    assert set(shape) == set(schema["properties"]["model"]["properties"]["build_tiny"]["properties"])


def test_readme_names_every_config_key():
    """README's Configuration section names every key a user may set (training.* as a whole; model.build_tiny's
    and dataset.fields' own keys are shown where they are explained). dataset.split, model.trust_remote_code
    and experiment were left out of it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Configuration"):text.index("\n## Layout")]
    named = set()
    for prefix, group in re.findall(r"`([a-z_.]*?)\{([a-z_, \n]+)\}`", section):  # methods.lora.{ranks, ...}
        named |= {prefix + k.strip() for k in group.split(",")}
    named |= set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)*)`", section))
    schema = yaml.safe_load((REPO / "lorasweep" / "config.schema.yaml").read_text())
    sections = ("model", "dataset", "methods", "methods.full", "methods.lora", "methods.qlora", "training")
    missing = [path for path in _schema_keys(schema)
               if path not in sections and not path.startswith(("training.", "model.build_tiny.", "dataset.fields."))
               and path not in named]
    assert "training.*" in section and not missing, f"README's Configuration section does not name {missing}"


def test_run_spec_holds_only_that_runs_settings():
    cfg = validate_config(copy.deepcopy(MINIMAL))
    before = run_spec(cfg, "lora-r8")
    cfg["methods"]["full"]["learning_rate"] = 1.0
    cfg["methods"]["qlora"]["double_quant"] = True
    cfg["experiment"] = "renamed"
    assert run_spec(cfg, "lora-r8") == before  # changing other runs' settings does not retrain this one
    cfg["methods"]["lora"]["dropout"] = 0.0
    assert run_spec(cfg, "lora-r8") != before
    with pytest.raises(ConfigError, match="not in this configuration"):
        run_spec(cfg, "lora-r16")


def test_any_rank_list_and_all_linear():
    cfg = validate_config({**copy.deepcopy(MINIMAL), "methods": {
        "full": {"enabled": False}, "lora": {"ranks": [4, 16], "target_modules": "all-linear"},
        "qlora": {"ranks": []}}})
    assert run_names(cfg) == ["lora-r4", "lora-r16"]
    assert run_spec(cfg, "lora-r16")["lora"]["target_modules"] == "all-linear"


def test_qlora_takes_the_lora_settings_so_that_the_pair_differs_by_quantization_alone():
    cfg = validate_config({**copy.deepcopy(MINIMAL), "methods": {
        "full": {"enabled": False}, "lora": {"ranks": [8], "use_rslora": True, "init": "olora"},
        "qlora": {"ranks": [8]}}})
    assert run_names(cfg) == ["lora-r8-olora-rslora", "qlora-r8-rslora"]  # olora has no 4-bit form
    q, l = run_spec(cfg, "qlora-r8-rslora")["lora"], run_spec(cfg, "lora-r8-olora-rslora")["lora"]
    assert q["use_rslora"] and {**q, "init": "olora"} == l


@pytest.mark.parametrize(
    "override, message",
    [
        ({"methods": {"lora": {"ranks": [0]}}}, r"methods.lora.ranks\[0\] = 0: must be a rank \(integer >= 1\)"),
        ({"methods": {"lora": {"rank": [8]}}}, r"unknown key\(s\) methods.lora.rank; allowed here: .*ranks"),
        ({"methods": {"dora": {}}}, r"unknown key\(s\) methods.dora; allowed here: full, lora, qlora\n"),
        ({"run_info": {}}, r"unknown key\(s\) run_info; .*put targets before --configfile"),  # metrics.json as config
        ({"run": "full", "method": "full", "eval_loss": 1.5},  # a metrics.json: "method" is close to "methods"
         r"unknown key\(s\) eval_loss, method, run; .*put targets before --configfile"),
        ({"methods": {"qlora": {"quant_type": "int4"}}}, r"methods.qlora.quant_type = 'int4': must be one of 'nf4', 'fp4'"),
        ({"dataset": {"source": "x.json", "fraction": 1.5}}, r"dataset.fraction = 1.5: must be <= 1"),
        ({"dataset": {"source": "x.json", "fraction": 0}}, r"dataset.fraction = 0: must be > 0"),
        ({"methods": {"lora": {"target_modules": 3}}}, r"target_modules = 3: must be a list of module names, 'attention' or 'all-linear'"),
        ({"training": {"batch_size": "8"}}, r"training.batch_size = '8': must be of type integer"),
        ({"dataset": {"source": "x.json", "eval_size": 1.5}}, r"dataset.eval_size = 1.5: a share below 1"),
        ({"seed": 42.0}, r"seed = 42.0: must be of type integer \(a whole number, written without a decimal point: 42\)"),
        ({"methods": {"lora": {"ranks": [8.0]}}}, r"methods.lora.ranks\[0\] = 8.0: must be a rank \(integer >= 1\)"),
        ({"model": {"build_tiny": {"hidden_size": 64, "num_heads": 5}}},
         r"build_tiny.hidden_size = 64 must be a multiple of model.build_tiny.num_heads = 5"),
        ({"model": {"build_tiny": {"max_positions": 128}}, "training": {"max_length": 256}},
         r"training.max_length = 256 is above model.build_tiny.max_positions = 128"),
        ({"methods": {"lora": {"learning_rate": "1e-3"}}},  # PyYAML reads 1e-3 (no decimal point) as text
         r"methods.lora.learning_rate = '1e-3': must be of type number \(YAML reads 1e-3 as text.*1.0e-3"),
        ({"training": {"max_steps": 0}}, r"training.max_steps = 0: must be -1"),
        ({"training": {"torch_compile": "fast"}},
         r"training.torch_compile = 'fast': must be one of False, True, 'default', 'reduce-overhead'"),
        ({"methods": {"full": {"enabled": False}, "lora": {"ranks": []}, "qlora": {"ranks": []}}}, "no runs enabled"),
        ({"training": {"torch_compile_regional": True}}, r"training.torch_compile_regional = true needs training.torch_compile"),
        # a misspelt key in any section is an error, never a setting silently left at its default
        ({"training": {"bach_size": 8}}, r"unknown key\(s\) training.bach_size; allowed here: .*batch_size.* "
                                         r"\(did you mean training.batch_size for training.bach_size\?\)"),
        ({"trainig": {"epochs": 1}}, r"unknown key\(s\) trainig; allowed here: .*\(did you mean training for "
                                     r"trainig\?\)\n"),  # a misspelt section, not a target read as a config file
        ({"dataset": {"source": "x.json", "eval_split": 0.1}}, r"unknown key\(s\) dataset.eval_split; allowed here: .*eval_size"),
        ({"model": {"name": "m"}}, r"unknown key\(s\) model.name; allowed here: .*name_or_path"),
        ({"model": {"build_tiny": {"layers": 2}}}, r"unknown key\(s\) model.build_tiny.layers; allowed here: .*num_layers"),
        ({"methods": {"full": {"lr": 1.0e-5}}}, r"unknown key\(s\) methods.full.lr; allowed here: enabled, learning_rate"),
        ({"methods": {"full": False}}, r"methods.full = False: must be of type object \(to switch it off: "
                                       r"methods.full.enabled: false\)"),
        ({"methods": {"qlora": {"quant": "nf4"}}}, r"unknown key\(s\) methods.qlora.quant; allowed here: .*quant_type"),
        # the tiny preset builds its model at name_or_path: a user's own directory (or a hub id) there is refused
        ({"model": {"name_or_path": "my-model", "build_tiny": {}}},
         r"model.name_or_path = 'my-model' with model.build_tiny set: .*deleting .* set model.build_tiny: null"),
        ({"model": {"name_or_path": "results/../my-model", "build_tiny": {}}}, r"name a folder of its own under results/"),
        ({"model": {"name_or_path": "results/runs/full", "build_tiny": {}}}, r"not results/data, results/runs"),
        ({"model": {"name_or_path": "results", "build_tiny": {}}}, r"name a folder of its own under results/"),
        # init and use_dora named where they were set: methods.lora's own keys, or the ranks entry's
        ({"methods": {"lora": {"init": "olora", "use_dora": True}}},
         r"methods.lora.ranks\[0\]: init 'olora' \(methods.lora.init\) cannot be combined with use_dora "
         r"\(methods.lora.use_dora\)"),
        ({"methods": {"lora": {"ranks": [{"rank": 8, "init": "pissa"}], "use_dora": True}}},
         r"init 'pissa' \(methods.lora.ranks\[0\].init\) cannot be combined with use_dora \(methods.lora.use_dora\)"),
        # a ranks entry {rank, ...}: what is wrong inside it, by key, not the whole entry and its shape
        ({"methods": {"lora": {"ranks": [8, {"rank": 8, "init": "svd"}]}}},
         r"  - methods.lora.ranks\[1\].init = 'svd': must be one of 'default', 'olora', 'pissa'\n\(schema"),
        ({"methods": {"lora": {"ranks": [{"rank": 0, "use_rsloraa": True}]}}},
         r"unknown key\(s\) methods.lora.ranks\[0\].use_rsloraa; allowed here: init, rank, use_dora, use_rslora \(did "
         r"you mean methods.lora.ranks\[0\].use_rslora for methods.lora.ranks\[0\].use_rsloraa\?\)\n"
         r"  - methods.lora.ranks\[0\].rank = 0: must be >= 1\n"),
        ({"methods": {"qlora": {"ranks": [{"rank": 8, "init": "olora"}]}}},
         r"unknown key\(s\) methods.qlora.ranks\[0\].init; allowed here: rank, use_dora, use_rslora \(QLoRA runs use "
         r"the default init: olora / pissa have no 4-bit form\)\n"),
        # methods.qlora.init: not pointed at methods.lora.init, which QLoRA runs do not take either
        ({"methods": {"qlora": {"init": "olora"}}},
         r"unknown key\(s\) methods.qlora.init; allowed here: double_quant, learning_rate, quant_type, ranks \(QLoRA "
         r"runs use the default init: olora / pissa have no 4-bit form\)\n"),
        # a key of another section: where it belongs, not "a target read as a config file"
        ({"batch_size": 4}, r"unknown key\(s\) batch_size; allowed here: .*\(did you mean training.batch_size for "
                            r"batch_size\?\)\n"),
        ({"lora": {"ranks": [8]}}, r"unknown key\(s\) lora; .*\(did you mean methods.lora for lora\?\)\n"),
        ({"training": {"learning_rate": 1.0e-4}}, r"unknown key\(s\) training.learning_rate; allowed here: .*\(did you "
         r"mean methods.full.learning_rate or methods.lora.learning_rate or methods.qlora.learning_rate for "
         r"training.learning_rate\?\)"),
        # null where a choice is expected: one line, with the choices; a nullable key's types read as words
        ({"training": {"device": None}}, r"configuration:\n  - training.device = None: must be one of 'cuda', 'cpu', 'auto'\n\(schema"),
        ({"model": {"revision": 5}}, r"model.revision = 5: must be of type string or null\n"),
        # known before any job: the training job stopped on it only after the data step
        ({"training": {"device": "cpu", "precision": "fp16"}},
         r"training.precision = 'fp16' is not supported with training.device = 'cpu': use 'fp32', 'bf16' or 'auto'"),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(override, message):
    from lorasweep.config import deep_merge

    with pytest.raises(ConfigError, match=message):
        validate_config(deep_merge(MINIMAL, override))


def test_a_strangers_override_file_is_refused_before_any_job_naming_each_key(tmp_path):
    """snakemake itself, on an override file with a misplaced key and a bad ranks entry: one readable line each."""
    from conftest import run_snakemake

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: m}\ndataset: {source: d.json}\nbatch_size: 4\n"
                   "methods: {lora: {ranks: [8, {rank: 128, init: svd}]}}\n")
    proc = run_snakemake("-n", "--cores", 1, "--configfile", bad, workdir=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out and not (tmp_path / "results").exists()
    assert "  - unknown key(s) batch_size; allowed here: dataset, experiment, methods, model, seed, seeds, training " \
           "(did you mean training.batch_size for batch_size?)\n" in out
    assert "  - methods.lora.ranks[1].init = 'svd': must be one of 'default', 'olora', 'pissa'\n" in out


def test_a_section_written_twice_in_a_config_file_is_refused_before_any_job(tmp_path):
    """YAML keeps the last of two keys of the same name: the first training: block's settings were dropped without a
    word (the dry run planned the sweep with epochs back at the preset's 3)."""
    from conftest import run_snakemake

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 1\nmethods:\n  lora: {ranks: [8, 8.5], ranks: [8]}\ntraining:\n  batch_size: 4\n")
    proc = run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", bad, workdir=tmp_path,
                         check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (tmp_path / "results").exists()
    assert f"{bad}: methods.lora.ranks is written twice (lines 4 and 4); training is written twice (lines 1 and 5): " \
           "YAML keeps only the last" in out
    with pytest.raises(ConfigError, match=r"training is written twice \(lines 1 and 5\)"):
        load_config(REPO / "config" / "config.yaml", bad)


ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}  # a locale whose encoding is ASCII, as Python sees it


def test_the_workflow_starts_in_an_ascii_locale(tmp_path):
    """On a machine whose locale is not UTF-8 (LANG=C with Python's UTF-8 mode off, or a Latin-1 one), lorasweep read
    config/config.yaml (its comments hold ± and −) in the locale's encoding, after Snakemake had read it as UTF-8:
    UnicodeDecodeError in common.smk, before any job. A user's override file with a non-ASCII comment reads too."""
    from conftest import run_snakemake

    override = tmp_path / "mine.yaml"
    override.write_text("experiment: tiny résumé   # ± a comment in UTF-8\n", encoding="utf-8")
    proc = run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", override,
                         workdir=tmp_path, env=ASCII_LOCALE)
    assert "UnicodeDecodeError" not in proc.stdout + proc.stderr and "prepare_data" in proc.stdout


def test_a_key_written_twice_in_a_tab_indented_json_config_file_is_refused_before_any_job(tmp_path):
    """Snakemake reads a config file as JSON first, and JSON may be indented with tabs, which YAML forbids: the check
    read such a file as YAML only, gave up, and let Snakemake keep the last of two ``training`` sections."""
    from conftest import run_snakemake

    bad = tmp_path / "bad.json"
    bad.write_text('{\n\t"training": {"epochs": 1},\n\t"methods": {"lora": {"ranks": [8]}},\n'
                   '\t"training": {\n\t\t"batch_size": 4\n\t}\n}\n')
    proc = run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", bad, workdir=tmp_path,
                         check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (tmp_path / "results").exists()
    assert f"{bad}: training is written twice (lines 2 and 4): " in out, out[-3000:]
    good = tmp_path / "good.json"
    good.write_text('{\n\t"training": {\n\t\t"epochs": 1,\n\t\t"batch_size": 4\n\t}\n}\n')
    run_snakemake("-n", "--cores", 1, "--configfile", REPO / "config" / "tiny.yaml", good, workdir=tmp_path)


def test_yaml_anchors_pass_the_repeated_key_check_and_a_recursive_alias_is_a_config_error(tmp_path):
    """Anchors and merge keys repeat no key (a key the merged mapping overrides is its own); an alias of a node that
    holds it (``&a [*a]``) was followed without end (RecursionError, a traceback) where the schema names the key."""
    ok = tmp_path / "ok.yaml"
    ok.write_text("methods:\n  lora: &m {learning_rate: 5.0e-3, ranks: [8]}\n  qlora:\n    <<: *m\n"
                  "    learning_rate: 1.0e-3\n    ranks: [8]\n")
    cfg = load_config(REPO / "config" / "config.yaml", ok)
    assert cfg["methods"]["qlora"]["learning_rate"] == 1.0e-3 and cfg["methods"]["lora"]["learning_rate"] == 5.0e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: &a [*a]\n")
    with pytest.raises(ConfigError, match=r"seeds\[0\] = \[\[\.\.\.\]\]: must be of type integer"):
        load_config(REPO / "config" / "config.yaml", bad)


def test_missing_top_level_key_explains_how_config_files_combine():
    with pytest.raises(ConfigError, match="merges --configfile files over config/config.yaml"):
        validate_config({"dataset": {"source": "x.json"}})


def test_operational_settings_stay_out_of_every_run_spec():
    """How a run is executed (the settings the workflow test changes in ops.yaml) is not what it computes: no run's
    spec, which Snakemake's params trigger compares, changes with them; a setting that is not operational does."""
    from lorasweep.config import OPERATIONAL_KEYS, deep_merge

    base = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    ops = {"checkpoint_steps": 7, "checkpoint_min_interval_s": 5, "keep_checkpoints": True, "threads": 1,
           "torch_compile": True, "torch_compile_regional": True, "pad_to_multiple_of": 64, "jobs_per_gpu": 2,
           "cudnn_attention": True, "frozen_weights_16bit": False, "eval_batch_size": 4}
    assert set(ops) == set(OPERATIONAL_KEYS)
    plain, changed = validate_config(copy.deepcopy(base)), validate_config(deep_merge(base, {"training": ops}))
    for run in run_names(plain):
        assert run_spec(changed, run) == run_spec(plain, run), run
        assert not set(ops) & set(run_spec(plain, run)["training"]), run
    computed = validate_config(deep_merge(base, {"training": {"max_length": 128}}))
    assert run_spec(computed, "full") != run_spec(plain, "full")


def test_a_runs_settings_are_one_value_each_the_same_names_whatever_the_other_runs():
    """The workflow hands each run's settings to Snakemake as one `name=value` param each (its rerun reason then
    names the setting that changed): every setting of every kind of run has a name, a run's settings do not move
    when other runs come or go, and a setting reaches exactly the runs it belongs to."""
    from lorasweep.config import deep_merge, flat_settings, setting_names, setting_param

    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    variants = {"methods": {"lora": {"ranks": [8, {"rank": 16, "init": "olora", "use_rslora": True}, {"rank": 32, "use_dora": True}]},
                            "qlora": {"ranks": [8, {"rank": 4, "use_dora": True}]}}, "seeds": [0, 1]}
    cfg = validate_config(deep_merge(base, variants))
    names = setting_names()
    for run in run_names(cfg):
        for seed in (0, 1):
            flat = flat_settings(run_spec(cfg, run, seed))  # raises on a setting without a name
            assert list(flat) == names and flat["run"] == run and flat["seed"] == seed
            rendered = [setting_param(n, v) for n, v in flat.items()]  # what Snakemake stores and compares
            assert len(set(rendered)) == len(names) and f'run="{run}"' in rendered and f"seed={seed}" in rendered
    full = flat_settings(run_spec(cfg, "full", 0))
    assert full["lora.r"] is None and full["quantization.bits"] is None and full["training.max_length"] == 512
    no_qlora = validate_config(deep_merge(base, {"methods": {"qlora": {"ranks": []}}}))
    assert flat_settings(run_spec(no_qlora, "full", 42)) == flat_settings(run_spec(validate_config(
        copy.deepcopy(base)), "full", 42))
    dropout = validate_config(deep_merge(base, {"methods": {"lora": {"dropout": 0.0}}}))
    changed = {run for run in run_names(dropout)
               if flat_settings(run_spec(dropout, run)) != flat_settings(run_spec(validate_config(copy.deepcopy(base)), run))}
    assert changed == {"lora-r8", "lora-r128", "lora-r256", "qlora-r8"}


def test_tiny_preset_validates_and_runs_on_cpu():
    cfg = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    cfg = validate_config(cfg)
    assert cfg["training"]["device"] == "cpu" and cfg["model"]["build_tiny"]
    assert run_names(cfg) == ["full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"]


def test_alpha_rule_is_per_rank_by_default_or_fixed():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert [run_spec(cfg, f"lora-r{r}")["lora"]["alpha"] for r in (8, 128, 256)] == [32, 512, 1024]
    cfg["methods"]["lora"]["alpha"] = 16
    validate_config(cfg)
    assert [run_spec(cfg, f"lora-r{r}")["lora"]["alpha"] for r in (8, 128, 256)] == [16, 16, 16]
    assert run_spec(cfg, "qlora-r8")["lora"]["alpha"] == 16  # QLoRA shares the LoRA settings
    cfg["methods"]["lora"]["alpha"] = 0
    with pytest.raises(ConfigError, match=r"methods.lora.alpha = 0: must be > 0"):
        validate_config(cfg)


def test_opt_350m_shape_preset_has_the_real_models_shape():
    """config/opt-350m-shape.yaml builds facebook/opt-350m's architecture offline: same parameter count."""
    import torch
    from transformers import OPTForCausalLM

    from lorasweep.tiny import OPT_350M_SHAPE, opt_config

    cfg = load_config(REPO / "config" / "config.yaml", REPO / "config" / "opt-350m-shape.yaml")
    shape = cfg["model"]["build_tiny"]
    assert shape == OPT_350M_SHAPE  # the benchmarks' --shape opt-350m builds the same
    assert run_names(cfg) == ["full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"]
    arch = {k: v for k, v in shape.items() if k != "vocab_size"}
    with torch.device("meta"):  # a tokenizer trained on 2k records has ~12k tokens; the embedding keeps 50,272 rows
        model = OPTForCausalLM(opt_config(11_756, **arch))
    assert model.config.vocab_size == 50272 and model.config.do_layer_norm_before is False
    assert sum(p.numel() for p in model.parameters()) == 331_196_416  # facebook/opt-350m: 331 M
    with pytest.raises(ConfigError, match="embedding_rows"):
        validate_config({**copy.deepcopy(MINIMAL), "model": {"name_or_path": "x", "build_tiny": {"embedding_rows": 5}}})


def test_a_local_file_of_another_format_is_named_before_any_job(tmp_path, monkeypatch):
    """A .csv (or any file but .json / .jsonl / .parquet) would be read as a hub dataset id and fail as a network
    problem inside the first job."""
    from lorasweep.config import check_dataset_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.csv").write_text("instruction,input,output\nAdd.,,3\n")
    with pytest.raises(ConfigError, match=r"dataset.source = 'mine.csv': a local file of a format lorasweep does not"):
        check_dataset_file({"dataset": {"source": "mine.csv"}})
    check_dataset_file({"dataset": {"source": "sahil2801/CodeAlpaca-20k"}})  # a hub id: no file, no error


def test_a_boolean_is_not_an_integer_setting():  # C02
    from lorasweep.config import ConfigError, validate_config

    cfg = {"model": {"name_or_path": "m"}, "dataset": {"source": "x.json"}, "training": {"batch_size": True}}
    with pytest.raises(ConfigError, match="training.batch_size = True: must be of type integer"):
        validate_config(cfg)


def test_a_job_computing_other_settings_than_the_workflow_recorded_stops():
    """The scripts compute a run's spec themselves; the params are what Snakemake recorded. A script that imports
    another lorasweep than the Snakefile's would train settings the workflow does not record: it stops."""
    from types import SimpleNamespace

    from lorasweep.config import flat_settings, job_spec, setting_param

    cfg = load_config(REPO / "config" / "config.yaml")
    spec = run_spec(cfg, "lora-r8")
    params = {f"setting_{i}": setting_param(n, v) for i, (n, v) in enumerate(flat_settings(spec).items())}
    smk = SimpleNamespace(config=cfg, wildcards=SimpleNamespace(run="lora-r8", seed=str(spec["seed"])), params=params)
    assert job_spec(smk) == spec
    params["setting_4"] = setting_param("learning_rate", 0.1)
    with pytest.raises(ConfigError, match="differ from those the workflow recorded .*learning_rate=0.1"):
        job_spec(smk)


def test_a_model_path_that_is_not_a_folder_and_a_dataset_folder_are_named_before_any_job(tmp_path, monkeypatch):
    """A model written as a path that does not exist would be read as a hub id, and fail in the first training job
    (after the data step, or after the network's retries) with an error about repository names; a dataset folder
    would be read by datasets but not followed by the workflow; a revision belongs to a hub id."""
    from lorasweep.config import check_dataset_file, check_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "opt-350m").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    for name, error in (("./opt-35Om", "folder not found"), ("/nowhere/opt-350m", "folder not found"),
                        ("../opt-350m", "folder not found"), ("./weights.safetensors", "a file, not a model folder"),
                        ("~/opt-350m", "write the path out")):
        with pytest.raises(ConfigError, match=f"model.name_or_path = '{re.escape(name)}': {error}"):
            check_model_path({"model": {"name_or_path": name}})
    for fine in ("./opt-350m", "opt-350m", "facebook/opt-350m", str(tmp_path / "opt-350m")):
        check_model_path({"model": {"name_or_path": fine}})
    check_model_path({"model": {"name_or_path": "./built-later", "build_tiny": {"hidden_size": 64}}})  # a rule builds it
    check_model_path({"model": {"name_or_path": "facebook/opt-350m", "revision": "a1b2c3"}})
    with pytest.raises(ConfigError, match="model.revision = 'main' is for a hub model"):
        check_model_path({"model": {"name_or_path": "./opt-350m", "revision": "main"}})

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "code_alpaca.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"dataset.source = 'ds' is a folder: name the data file in it "
                                          r"\(code_alpaca.json\)"):
        check_dataset_file({"dataset": {"source": "ds"}})
    with pytest.raises(ConfigError, match="dataset.revision = 'v1' is for a hub dataset"):
        check_dataset_file({"dataset": {"source": "ds/code_alpaca.json", "revision": "v1"}})


def test_an_unset_revision_is_no_param_snakemake_records_and_a_set_one_is():
    """model.revision came after sweeps had been trained: unset, its param is one Snakemake's params trigger leaves
    out (it compares the set of the params' reprs), so its arrival retrains no finished run; set, it is a setting
    like the others. The job's own check of its settings accepts both."""
    from types import SimpleNamespace

    from snakemake.persistence import UNREPRESENTABLE, PersistenceBase

    from lorasweep.config import Unrecorded, flat_settings, job_spec, setting_param

    assert setting_param("model.revision", None) == Unrecorded()
    stored = [PersistenceBase._serialize_param_builtin(None, v) for v in (Unrecorded(), None, "lora.r=null")]
    assert stored == [UNREPRESENTABLE, "None", "'lora.r=null'"]  # how Snakemake records params: left out, recorded
    assert setting_param("model.revision", "a1b2c3") == 'model.revision="a1b2c3"'
    assert setting_param("lora.r", None) == "lora.r=null"  # the settings that were always there stay recorded
    cfg = load_config(REPO / "config" / "config.yaml")
    for revision in (None, "a1b2c3"):
        cfg["model"]["revision"] = revision
        spec = run_spec(cfg, "full")
        assert spec["model"]["revision"] == revision
        params = {f"setting_{i}": setting_param(n, v) for i, (n, v) in enumerate(flat_settings(spec).items())}
        smk = SimpleNamespace(config=cfg, wildcards=SimpleNamespace(run="full", seed=str(spec["seed"])), params=params)
        assert job_spec(smk) == spec


def test_a_model_name_that_is_neither_a_folder_nor_a_hub_id_is_named_before_any_job(tmp_path, monkeypatch):
    """A name with more than one slash (a relative path to a folder not there yet) or a space is no hub id: with
    HF_HUB_OFFLINE=1 the cache lookup raised huggingface_hub's HFValidationError, which the workflow's start does not
    catch (a traceback naming no key); without it the first training job failed after the data step."""
    from lorasweep.config import check_model_path, check_offline_model_cached

    monkeypatch.chdir(tmp_path)
    for offline in ("", "1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        for name in ("models/opt/350m", "my model"):
            config = validate_config({"model": {"name_or_path": name}, "dataset": {"source": "x/y"}})
            with pytest.raises(ConfigError, match=rf"model.name_or_path = '{name}': not a folder .* nor a Hugging "
                                                  "Face hub id"):
                check_model_path(config)
            if offline:
                with pytest.raises(ConfigError, match=rf"model.name_or_path = '{name}': not a folder"):
                    check_offline_model_cached(config)
    (tmp_path / "models" / "opt" / "350m").mkdir(parents=True)  # the folder exists: a local model, no hub id
    check_model_path(validate_config({"model": {"name_or_path": "models/opt/350m"}, "dataset": {"source": "x/y"}}))
