from lorasweep.logs import script_logging
from lorasweep.report import render_report

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    inp, out = snakemake.input, snakemake.output  # noqa: F821
    render_report(inp.notebook, out.notebook, out.markdown, metrics_csv=inp.metrics, history_csv=inp.history,
                  eval_losses_csv=inp.eval_losses, data_summary=inp.data_summary, verify_jsons=list(inp.verify),
                  switch_json=inp.switch or "", samples_json=inp.samples,
                  experiment=snakemake.params.experiment, random_weights=snakemake.params.random_weights,  # noqa: F821
                  configfiles=list(snakemake.params.configfiles),  # noqa: F821
                  snakefile=snakemake.params.snakefile, first_seed=snakemake.params.first_seed,  # noqa: F821
                  config_overrides=dict(snakemake.params.config_overrides))  # noqa: F821
