from lorasweep.adapters import sample_runs
from lorasweep.collect import run_and_seed
from lorasweep.logs import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    inp, params = snakemake.input, snakemake.params  # noqa: F821
    models = {run_and_seed(p)[0]: p for p in inp.models}  # results/runs/<run>/seed<seed>/model
    sample_runs(params.specs, models, inp.eval, snakemake.output.samples)  # noqa: F821
