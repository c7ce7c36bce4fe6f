# Collect every run's metrics, plot them, render the report.

from lorasweep.plots import FIGURES

# for the report's rerun commands: the Snakefile relative to the working directory, unless snakemake finds it there
SNAKEFILE = os.path.relpath(workflow.main_snakefile)
if SNAKEFILE in ("Snakefile", "snakefile", os.path.join("workflow", "Snakefile"),
                 os.path.join("workflow", "snakefile")):
    SNAKEFILE = ""


rule collect:
    input:
        metrics=run_files("metrics.json"),
        histories=run_files("log_history.jsonl"),
        eval_losses=run_files("eval_losses.json"),
        code=code_inputs("collect.py"),
    output:
        metrics=report("results/metrics.csv", caption="../report/metrics.rst", category="Tables"),
        history="results/log_history.csv",
        eval_losses="results/eval_losses.csv",
    log:
        "logs/collect.log",
    benchmark:
        "results/benchmarks/collect.tsv"
    conda:
        ENV
    script:
        "../scripts/collect.py"


rule plot:
    input:
        metrics="results/metrics.csv",
        history="results/log_history.csv",
        code=code_inputs("plot.py"),
    output:
        png=[
            report(f"reports/figures/{name}.png", caption=f"../report/{name}.rst", category="Figures",
                   labels={"figure": name})
            for name in FIGURES
        ],
        svg=expand("reports/figures/{name}.svg", name=FIGURES),
    log:
        "logs/plot.log",
    benchmark:
        "results/benchmarks/plot.tsv"
    conda:
        ENV
    script:
        "../scripts/plot.py"


rule report:
    input:
        notebook=NOTEBOOK,
        metrics="results/metrics.csv",
        history="results/log_history.csv",
        eval_losses="results/eval_losses.csv",
        verify=run_files("verify.json", ADAPTER_RUNS, [FIRST_SEED]),
        switch="results/switch.json" if LORA_RUNS else [],
        samples="results/samples.json",
        data_summary="results/data/summary.json",
        figures=expand("reports/figures/{name}.png", name=FIGURES),
        code=code_inputs("report.py"),
    output:
        markdown="reports/summary.md",
        notebook="reports/summary.ipynb",
    params:
        experiment=config["experiment"],
        random_weights=bool(config["model"]["build_tiny"]),  # a model the workflow built: the report says so
        # the --configfile files, for the report's rerun commands (relative to the working directory)
        configfiles=[os.path.relpath(str(f)) for f in workflow.overwrite_configfiles],
        snakefile=SNAKEFILE,
        config_overrides=dict(workflow.config_settings.config or {}),  # its --config values, for the same commands
        first_seed=FIRST_SEED,  # whose models verify, switch and samples used (the report says so)
    log:
        "logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    conda:
        ENV
    script:
        "../scripts/report.py"
