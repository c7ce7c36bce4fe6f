from lorasweep.adapters import verify_run
from lorasweep.config import job_spec
from lorasweep.logs import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    inp = snakemake.input  # noqa: F821
    verify_run(job_spec(snakemake), inp.adapter, inp.merged, inp.eval, snakemake.output.verify,  # noqa: F821
               trained_losses=inp.trained, trained_metrics=inp.metrics)
