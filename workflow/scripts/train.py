from lorasweep.config import operational
from lorasweep.logs import script_logging
from lorasweep.train import train_run

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    inp, out = snakemake.input, snakemake.output  # noqa: F821
    train_run(snakemake.params.spec, inp.train, inp.eval, out_dir=out.model.rsplit("/", 1)[0],  # noqa: F821
              data_summary_path=inp.summary, threads=snakemake.threads,  # noqa: F821
              workflow_dir=snakemake.scriptdir, operational=operational(snakemake.config))  # noqa: F821
