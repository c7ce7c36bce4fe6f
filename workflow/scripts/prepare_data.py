from lorasweep.data import prepare
from lorasweep.logs import script_logging

with script_logging(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    p, out = snakemake.params, snakemake.output  # noqa: F821
    prepare(p.source, out.train, out.eval, out.summary, split=p.split, eval_size=p.eval_size,
            fraction=p.fraction, seed=p.seed, revision=p.revision, fields=p.get("fields"))
