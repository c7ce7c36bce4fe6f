# One training job per run (full, lora-r{rank}, qlora-r{rank}) and training seed, each holding one `gpu` resource.


rule train:
    input:
        train="results/data/train.jsonl",
        eval="results/data/eval.jsonl",
        summary="results/data/summary.json",
        model=get_model_input,
    output:
        metrics="results/runs/{run}/seed{seed}/metrics.json",
        history="results/runs/{run}/seed{seed}/log_history.jsonl",
        eval_losses="results/runs/{run}/seed{seed}/eval_losses.json",
        model=directory("results/runs/{run}/seed{seed}/model"),
    params:
        **RUN_SETTINGS,
        model_files=f"model_files_sha256={MODEL_FILES_SHA256}" if MODEL_FILES_SHA256 else Unrecorded(),
    log:
        "logs/train/{run}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train/{run}/seed{seed}.tsv"
    threads: TRAIN_THREADS
    # a run that ran out of memory is retried with half the per-device batch (twice the accumulation); a retry
    # after an error that no retry changes (configuration, data, model files) stops at once
    retries: 2
    resources:
        gpu=1,
        attempt=lambda wildcards, attempt: attempt,  # the script's view of which try this is
    conda:
        ENV
    script:
        "../scripts/train.py"
