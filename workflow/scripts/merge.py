from lorasweep.adapters import merge_run
from lorasweep.config import job_spec
from lorasweep.logs import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    merge_run(job_spec(snakemake), snakemake.input.adapter, snakemake.output.merged)  # noqa: F821
