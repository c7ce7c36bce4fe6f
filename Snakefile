# lorasweep: full fine-tuning vs LoRA ranks vs QLoRA, one job per run, measured and reported.
#
#   snakemake --cores 4 --resources gpu=1                                # default experiment (needs a CUDA GPU)
#   snakemake --cores 4 --resources gpu=1 --configfile config/tiny.yaml  # tiny preset, CPU, minutes
#
# Rules are thin: each script turns the `snakemake` object into one call into the `lorasweep` package.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/adapters.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "reports/summary.md",
        # the report reads the PNGs; asked for here too, a deleted SVG is drawn again
        expand("reports/figures/{name}.svg", name=FIGURES),
        # every run's files, and the merged models the report's checks were made on: a job that failed (a retrain
        # that ran out of disk, a setting that failed and was taken back) has had its old outputs deleted by
        # Snakemake, and with only the report asked for, the next run found the report up to date ("Nothing to be
        # done") while it showed a run whose files were gone
        run_files("metrics.json"),
        run_files("log_history.jsonl"),
        run_files("eval_losses.json"),
        run_files("model"),
        run_files("merged", ADAPTER_RUNS, [FIRST_SEED]),
    default_target: True


onerror:
    report_failures()
