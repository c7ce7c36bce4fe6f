from lorasweep.collect import collect
from lorasweep.logs import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    collect(snakemake.input.metrics, snakemake.input.histories, snakemake.output.metrics,  # noqa: F821
            snakemake.output.history, snakemake.input.eval_losses, snakemake.output.eval_losses)  # noqa: F821
