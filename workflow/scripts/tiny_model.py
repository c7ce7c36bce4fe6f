from lorasweep.logs import script_logging
from lorasweep.tiny import build_tiny_model_from_jsonl

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    build_tiny_model_from_jsonl(snakemake.input.train, snakemake.output[0], seed=snakemake.params.seed,  # noqa: F821
                                **snakemake.params.arch)  # noqa: F821
