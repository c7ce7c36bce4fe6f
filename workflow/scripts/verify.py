from lorasweep.adapters import verify_run
from lorasweep.logs import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    inp = snakemake.input  # noqa: F821
    verify_run(snakemake.params.spec, inp.adapter, inp.merged, inp.eval, snakemake.output.verify,  # noqa: F821
               trained_losses=inp.trained)
