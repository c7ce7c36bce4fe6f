from pathlib import Path

from lorasweep.config import job_spec
from lorasweep.logs import script_logging
from lorasweep.train import train_job

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    inp = snakemake.input  # noqa: F821
    train_job(snakemake.config, job_spec(snakemake), inp.train, inp.eval, inp.summary,  # noqa: F821
              out_dir=Path(snakemake.output.model).parent, threads=snakemake.threads,  # noqa: F821
              workflow_dir=snakemake.scriptdir,  # noqa: F821
              attempt=getattr(snakemake.resources, "attempt", None))  # noqa: F821
