from pathlib import Path

from lorasweep.logs import script_logging
from lorasweep.plots import plot_all

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    plot_all(snakemake.input.metrics, snakemake.input.history, Path(snakemake.output.png[0]).parent)  # noqa: F821
