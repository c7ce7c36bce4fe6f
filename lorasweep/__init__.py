"""lorasweep: compare full fine-tuning, LoRA ranks and QLoRA on one model and one dataset.

The Snakemake workflow (``Snakefile``) calls thin scripts in ``workflow/scripts/``; all logic lives
in this package so that it can be imported by tests and run outside Snakemake for debugging.
"""

__version__ = "0.1.0"
