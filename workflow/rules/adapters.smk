# After training (write-up W5): merge each adapter, verify the merge, switch adapters on one base, sample.

ADAPTER_RUNS = [r for r in RUNS if r != "full"]
LORA_RUNS = [r for r in RUNS if r.startswith("lora-")]
# merge and verify work for any seed; the report asks for the first seed's (replicates would repeat them)


rule merge:
    input:
        adapter="results/runs/{run}/seed{seed}/model",
        model=get_model_input,
    output:
        merged=directory("results/runs/{run}/seed{seed}/merged"),
    params:
        **RUN_SETTINGS,
    log:
        "logs/merge/{run}/seed{seed}.log",
    benchmark:
        "results/benchmarks/merge/{run}/seed{seed}.tsv"
    conda:
        ENV
    script:
        "../scripts/merge.py"


rule verify:
    input:
        adapter="results/runs/{run}/seed{seed}/model",
        merged="results/runs/{run}/seed{seed}/merged",
        eval="results/data/eval.jsonl",
        trained="results/runs/{run}/seed{seed}/eval_losses.json",
        metrics="results/runs/{run}/seed{seed}/metrics.json",  # the precision training evaluated in
    output:
        verify="results/runs/{run}/seed{seed}/verify.json",
    params:
        **RUN_SETTINGS,
    log:
        "logs/verify/{run}/seed{seed}.log",
    benchmark:
        "results/benchmarks/verify/{run}/seed{seed}.tsv"
    conda:
        ENV
    script:
        "../scripts/verify.py"


rule switch:
    input:
        adapters=run_files("model", LORA_RUNS, [FIRST_SEED]),
        eval="results/data/eval.jsonl",
        model=get_model_input,
    output:
        switch="results/switch.json",
    params:
        spec=lambda wildcards: run_spec(config, LORA_RUNS[0], FIRST_SEED),
        names=LORA_RUNS,
    log:
        "logs/switch.log",
    benchmark:
        "results/benchmarks/switch.tsv"
    conda:
        ENV
    script:
        "../scripts/switch.py"


rule samples:
    input:
        models=run_files("model", RUNS, [FIRST_SEED]),
        eval="results/data/eval.jsonl",
        model=get_model_input,
    output:
        samples="results/samples.json",
    params:
        specs=lambda wildcards: {r: run_spec(config, r, FIRST_SEED) for r in RUNS},
    log:
        "logs/samples.log",
    benchmark:
        "results/benchmarks/samples.tsv"
    conda:
        ENV
    script:
        "../scripts/samples.py"
