from lorasweep.adapters import switch_adapters
from lorasweep.logs import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    inp, params = snakemake.input, snakemake.params  # noqa: F821
    switch_adapters(params.spec, dict(zip(params.names, inp.adapters)), inp.eval, snakemake.output.switch)  # noqa: F821
