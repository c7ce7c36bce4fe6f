from lorasweep.config import operational
from lorasweep.gpu_slots import GpuSlot
from lorasweep.logs import script_logging
from lorasweep.train import train_run

# one GPU per concurrent training job (a no-op without GPUs or with one): claimed before CUDA starts
with script_logging(snakemake.log[0]), GpuSlot(".snakemake/lorasweep-gpu-slots"):  # noqa: F821
    inp, out = snakemake.input, snakemake.output  # noqa: F821
    train_run(snakemake.params.spec, inp.train, inp.eval, out_dir=out.model.rsplit("/", 1)[0],  # noqa: F821
              data_summary_path=inp.summary, threads=snakemake.threads,  # noqa: F821
              workflow_dir=snakemake.scriptdir, operational=operational(snakemake.config))  # noqa: F821
