from lorasweep.logs import script_logging
from lorasweep.tiny import build_tiny_model_from_jsonl

with script_logging(snakemake.log[0]) as log:  # noqa: F821 - injected by Snakemake
    path = build_tiny_model_from_jsonl(snakemake.input.train, snakemake.output[0],  # noqa: F821
                                       seed=snakemake.params.seed, **snakemake.params.arch)  # noqa: F821
    log.info("built a randomly initialised OPT model %s and its tokenizer (trained on %s) in %s",
             dict(snakemake.params.arch), snakemake.input.train, path)  # noqa: F821
