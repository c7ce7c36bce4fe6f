# After training (write-up W5): merge each adapter, verify the merge, switch adapters on one base, sample.

ADAPTER_RUNS = [r for r in RUNS if r != "full"]
LORA_RUNS = [r for r in RUNS if r.startswith("lora-")]


rule merge:
    input:
        adapter="results/runs/{run}/model",
        model=get_model_input,
    output:
        merged=directory("results/runs/{run}/merged"),
    params:
        spec=get_run_spec,
    log:
        "logs/merge/{run}.log",
    benchmark:
        "results/benchmarks/merge/{run}.tsv"
    conda:
        ENV
    script:
        "../scripts/merge.py"


rule verify:
    input:
        adapter="results/runs/{run}/model",
        merged="results/runs/{run}/merged",
        eval="results/data/eval.jsonl",
    output:
        verify="results/runs/{run}/verify.json",
    params:
        spec=get_run_spec,
    log:
        "logs/verify/{run}.log",
    benchmark:
        "results/benchmarks/verify/{run}.tsv"
    conda:
        ENV
    script:
        "../scripts/verify.py"


rule switch:
    input:
        adapters=expand("results/runs/{run}/model", run=LORA_RUNS),
        eval="results/data/eval.jsonl",
        model=get_model_input,
    output:
        switch="results/switch.json",
    params:
        spec=lambda wildcards: run_spec(config, LORA_RUNS[0]),
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
        models=expand("results/runs/{run}/model", run=RUNS),
        eval="results/data/eval.jsonl",
        model=get_model_input,
    output:
        samples="results/samples.json",
    params:
        specs=lambda wildcards: {r: run_spec(config, r) for r in RUNS},
    log:
        "logs/samples.log",
    benchmark:
        "results/benchmarks/samples.tsv"
    conda:
        ENV
    script:
        "../scripts/samples.py"
