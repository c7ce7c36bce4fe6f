# Data: the tiny preset's dataset and model, and the train / eval split shared by every run.


rule tiny_dataset:
    output:
        TINY_DATASET,
    log:
        "logs/tiny_dataset.log",
    conda:
        ENV
    script:
        "../scripts/tiny_dataset.py"


rule prepare_data:
    input:
        get_dataset_input,
    output:
        train="results/data/train.jsonl",
        eval="results/data/eval.jsonl",
        summary="results/data/summary.json",
    params:
        source=config["dataset"]["source"],
        source_sha256=DATASET_SHA256,
        # a hub dataset's split; a local file has none (a changed split would otherwise retrain every run)
        split=None if is_local_source(config["dataset"]["source"]) else config["dataset"]["split"],
        revision=config["dataset"]["revision"],
        fraction=config["dataset"]["fraction"],
        eval_size=config["dataset"]["eval_size"],
        seed=config["seed"],
        # the dataset's own field names; a param only when set (sweeps prepared before it existed stay up to date)
        **({"fields": config["dataset"]["fields"]} if config["dataset"]["fields"] else {}),
    log:
        "logs/prepare_data.log",
    benchmark:
        "results/benchmarks/prepare_data.tsv"
    conda:
        ENV
    script:
        "../scripts/prepare_data.py"


if config["model"]["build_tiny"]:

    rule tiny_model:
        input:
            train="results/data/train.jsonl",
        output:
            directory(config["model"]["name_or_path"]),
        params:
            arch=config["model"]["build_tiny"],
            seed=config["seed"],
        log:
            "logs/tiny_model.log",
        conda:
            ENV
        script:
            "../scripts/tiny_model.py"
