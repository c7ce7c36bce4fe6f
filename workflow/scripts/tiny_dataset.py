from lorasweep.logs import script_logging
from lorasweep.tiny import write_tiny_dataset

with script_logging(snakemake.log[0]) as log:  # noqa: F821 - injected by Snakemake
    path = write_tiny_dataset(snakemake.output[0])  # noqa: F821
    log.info("wrote the tiny CodeAlpaca-style dataset to %s", path)
