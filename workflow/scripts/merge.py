from lorasweep.adapters import merge_run
from lorasweep.logs import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    merge_run(snakemake.params.spec, snakemake.input.adapter, snakemake.output.merged)  # noqa: F821
