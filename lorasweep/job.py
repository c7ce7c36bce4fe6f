"""Run one job of the workflow in this process, in the foreground, outside Snakemake's scheduler (to debug it).

    python -m lorasweep.job results/runs/lora-r8/seed0/metrics.json --cores 4 --configfile config/tiny.yaml [--pdb]

Run from the workflow's working directory, with the target and the options you gave ``snakemake`` (the target goes
first; any Snakemake option is read by Snakemake's own command line parser, profiles and the workflow profile
included). Snakemake loads the workflow (the Snakefile validates the config), finds the job that makes the target as
``snakemake -n <target>`` would (its rule and wildcards), and this module runs the rule's script here, with the
``snakemake`` object Snakemake would give it: input, output, params, threads, resources, wildcards, config, log. The
job is always run (as ``--forcerun <target>``); an input that is missing or out of date stops it, naming the jobs
Snakemake would run first. Around the script, Snakemake's own bookkeeping: the old outputs, log and benchmark (this
writes none) are deleted first, and on success the outputs are checked and recorded in ``.snakemake/`` as if Snakemake
had run the job (the next ``snakemake`` trusts them and reruns only what depends on them); on failure the outputs are
deleted, as Snakemake does. ``--pdb``: on an exception, a post-mortem debugger at the frame that raised it (before that
clean-up), and ``breakpoint()`` in the code stops at a debugger on the terminal (the scripts send stdout to the job's
log).
"""

from __future__ import annotations

import argparse
import os
import pdb
import runpy
import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM while the job runs (``kill``): the job stops and is cleaned up as after Ctrl-C, as Snakemake does on
    SIGTERM (Python's default action ends the process at once, leaving the outputs marked incomplete in
    ``.snakemake/``: the next ``snakemake`` stopped with IncompleteFilesException)."""


def _terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def _snakemake_job(api, argv):
    """The workflow and the job that makes the one target in ``argv`` (snakemake's command line), forced to run.

    Snakemake 9.27 has no public API that returns a DAG's jobs: this uses ``WorkflowApi._workflow`` and the
    ``Workflow._prepare_dag`` / ``_build_dag`` steps that ``DAGApi.printdag`` runs (``snakemake --dag``), with the
    execution settings ``DAGApi.execute_workflow`` sets (defaults), which the job's prepare / postprocess read."""
    from snakemake.cli import parse_args, parse_config
    from snakemake.settings.types import (ConfigSettings, DAGSettings, ExecutionSettings, RemoteExecutionSettings,
                                          ResourceSettings)

    _, args = parse_args(argv)
    workflow_api = api.workflow(
        resource_settings=ResourceSettings(
            cores=args.cores or os.cpu_count(),  # as --cores all; give snakemake's --cores for the same threads
            resources=args.resources, max_threads=args.max_threads, overwrite_threads=args.set_threads,
            overwrite_resources=args.set_resources, default_resources=args.default_resources),
        config_settings=ConfigSettings(config=parse_config(args.config), configfiles=args.configfile,
                                       config_args=args.config),
        snakefile=args.snakefile, workdir=args.directory)
    dag_api = workflow_api.dag(DAGSettings(targets=set(args.targets), forcetargets=True, force_incomplete=True,
                                           rerun_triggers=args.rerun_triggers))
    workflow = dag_api.workflow_api._workflow
    workflow.execution_settings, workflow.remote_execution_settings = ExecutionSettings(), RemoteExecutionSettings()
    workflow._prepare_dag(forceall=False, ignore_incomplete=False, lock_warn_only=True, nolock=True)
    workflow._build_dag()
    # as Workflow.execute before it runs jobs: from now on existence and mtimes are read afresh, not from the DAG's
    # cache (which says an output missing before the job is still missing: a failed job's partial output was not
    # deleted, and the next snakemake trusted it)
    workflow.iocache.deactivate()
    workflow.persistence.deactivate_cache()
    (job,) = workflow.dag.targetjobs
    return workflow, job, list(workflow.dag.needrun_jobs())


def run_job(target: str, snakemake_args=(), debug: bool = False) -> None:
    """Run the job that makes ``target`` here (see the module's doc); raise on failure (SystemExit from a script)."""
    from snakemake.api import SnakemakeApi
    from snakemake.exceptions import WorkflowError
    from snakemake.iocontainers import Snakemake
    from snakemake.settings.types import OutputSettings

    with SnakemakeApi(OutputSettings()) as api:
        try:
            workflow, job, needrun = _snakemake_job(api, [target, *snakemake_args])
        except Exception as e:  # noqa: BLE001 - Snakemake's own message, with the target it was about
            raise SystemExit(f"lorasweep.job: {target}: {type(e).__name__}: {e}") from None
        first = [j for j in needrun if j is not job]
        if first:
            raise SystemExit(
                f"lorasweep.job: {target}: Snakemake would first run " + "; ".join(
                    f"{j.rule.name} ({', '.join(map(str, j.output))}: {j.dag.reason(j)})" for j in first)
                + f".\nMake those first: snakemake {target} --omit-from {target} {' '.join(snakemake_args)}")
        if not job.rule.script or not str(job.rule.script).endswith(".py"):
            raise SystemExit(f"lorasweep.job: {target}: rule {job.rule.name} runs no Python script")
        script = job.rule.basedir.join(job.rule.script).get_path_or_uri(secret_free=True)
        scriptdir = os.path.dirname(script)
        smk = Snakemake(job.input, job.output, job.params, job.wildcards, job.threads, job.resources, job.log,
                        workflow.config, job.rule.name, 0 if job.benchmark else None, scriptdir)
        wildcards = ", ".join(f"{k}={v}" for k, v in job.wildcards.items())
        print(f"lorasweep.job: rule {job.rule.name}{f' ({wildcards})' if wildcards else ''}, threads {job.threads}, "
              f"log {', '.join(smk.log)}: running {os.path.relpath(script)} here",
              file=sys.stderr)
        if debug:  # breakpoint() on the terminal, not in the log the script's stdout goes to
            sys.breakpointhook = lambda *a, **k: pdb.Pdb(stdin=sys.__stdin__, stdout=sys.__stdout__).set_trace(
                sys._getframe(1))
        # Snakemake's steps around a job: mark its outputs incomplete, delete the old outputs and log, make folders
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminated)
        job.register()
        workflow.async_run(job.prepare())
        # the old benchmark too (Snakemake overwrites it after the job; this writes none): it measured the outputs
        # this run replaces, and Snakemake dates a job's outputs by the oldest of them and its benchmark, so the next
        # snakemake reran the job when the run followed an input's update (a folder's, or a changed file's: a file only
        # touched is excused by its recorded checksum)
        if job.benchmark and os.path.exists(job.benchmark):
            os.remove(job.benchmark)
        try:
            runpy.run_path(script, init_globals={"snakemake": smk}, run_name="__main__")
            # outputs there (else WorkflowError), recorded as Snakemake's; not the benchmark, which this does not write
            workflow.async_run(job.postprocess(ignore_missing_output=[job.benchmark] if job.benchmark else False))
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            # lorasweep's scripts turn an error, Ctrl-C included, into SystemExit(1) (lorasweep.logs.script_logging):
            # the error itself is its __context__
            err = e.__context__ if isinstance(e, SystemExit) and e.__context__ is not None else e
            if debug and not isinstance(err, KeyboardInterrupt):
                print(f"lorasweep.job: {type(err).__name__}: {err}\n(post-mortem; the outputs are deleted after it)",
                      file=sys.stderr)
                pdb.post_mortem(err.__traceback__)
            workflow.async_run(job.postprocess(error=True))  # as Snakemake: outputs deleted, record cleared
            if isinstance(e, WorkflowError):
                raise SystemExit(f"lorasweep.job: {target}: {e}") from None
            if isinstance(err, Terminated):
                raise SystemExit(128 + signal.SIGTERM) from None
            raise
        print(f"lorasweep.job: {target}: done; Snakemake records the job as its own", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lorasweep.job", description=__doc__.split("\n\n")[0],
        epilog="Other options are snakemake's (--cores, --configfile, --config, --snakefile, --directory, "
               "--set-threads, ...), read by its parser: give those of the snakemake run whose job you debug.")
    parser.add_argument("target", help="a file the job makes (or a rule without wildcards)")
    parser.add_argument("--pdb", action="store_true", help="post-mortem debugging on an exception")
    args, rest = parser.parse_known_args(argv)
    run_job(args.target, rest, debug=args.pdb)


if __name__ == "__main__":
    main()
