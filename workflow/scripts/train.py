from lorasweep.config import operational
from lorasweep.gpu_slots import GpuSlot
from lorasweep.logs import script_logging
from lorasweep.train import train_run

# a GPU slot per training job (training.jobs_per_gpu slots per GPU; a no-op without GPUs or for CPU training):
# claimed before CUDA starts
ops = operational(snakemake.config)  # noqa: F821
on_cpu = snakemake.config["training"]["device"] == "cpu"  # noqa: F821
with script_logging(snakemake.log[0]), GpuSlot(".snakemake/lorasweep-gpu-slots", gpus=[] if on_cpu else None,
                                               jobs_per_gpu=ops["jobs_per_gpu"]) as slot:
    inp, out = snakemake.input, snakemake.output  # noqa: F821
    train_run(snakemake.params.spec, inp.train, inp.eval, out_dir=out.model.rsplit("/", 1)[0],  # noqa: F821
              data_summary_path=inp.summary, threads=snakemake.threads,  # noqa: F821
              workflow_dir=snakemake.scriptdir, operational=ops, gpu_peers=slot.peers)  # noqa: F821
