"""The report, rendered from a fixture of a tiny sweep's results (no training), and the findings behind it."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lorasweep import findings as F
from lorasweep.plots import FIGURES, plot_all
from lorasweep.report import render_report
from conftest import REPO

FIXTURE = Path(__file__).parent / "fixtures" / "report"
TEMPLATE = REPO / "workflow" / "notebooks" / "summary.ipynb"


def _fixture():
    return pd.read_csv(FIXTURE / "metrics.csv"), pd.read_csv(FIXTURE / "eval_losses.csv")


def _render(tmp_path, metrics=None, eval_losses=None, **params):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    if metrics is not None:
        metrics.to_csv(results / "metrics.csv", index=False)
    if eval_losses is not None:
        eval_losses.to_csv(results / "eval_losses.csv", index=False)
    reports = tmp_path / "reports"
    plot_all(results / "metrics.csv", results / "log_history.csv", reports / "figures")
    md = render_report(TEMPLATE, reports / "summary.ipynb", reports / "summary.md",
                       metrics_csv=results / "metrics.csv", history_csv=results / "log_history.csv",
                       eval_losses_csv=results / "eval_losses.csv", data_summary=results / "summary.json",
                       experiment="fixture", **params)
    return md, md.read_text()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return _render(tmp_path_factory.mktemp("report"))


def test_report_has_every_section_and_no_code(rendered):
    md, text = rendered
    for heading in ["# fixture: full fine-tuning vs LoRA vs QLoRA", "## Findings", "## Setup", "## Results",
                    "## Figures", "## Memory: measured and predicted", "## LoRA's trade-offs in this sweep",
                    "## Beside the published write-ups", "## How to rerun"]:
        assert f"\n{heading}\n" in f"\n{text}", heading
    assert text.index("## Findings") < text.index("## Results")
    for code in ("import ", "display(", "Traceback", "ctx = ", "Error"):
        assert code not in text, code
    assert (md.parent / "summary.ipynb").exists()


def test_report_tables_hold_every_run(rendered):
    _, text = rendered
    runs = list(pd.read_csv(FIXTURE / "metrics.csv")["run"])
    results = text.split("## Results")[1].split("\n## ")[0]
    memory = text.split("## Memory: measured and predicted")[1].split("\n## ")[0]
    for section in (results, memory):
        rows = [line for line in section.splitlines() if line.startswith("|")]
        assert [r.split("|")[1].strip() for r in rows[2:]] == runs  # header, separator, one row per run
    writeups = text.split("## Beside the published write-ups")[1]
    for claim in ("full fine-tuning used the least peak memory", "peak memory rises with the rank"):
        assert claim in writeups
    assert "| W3 (unstated)" in writeups and "lorasweep (" in writeups


def test_report_figure_links_resolve(rendered):
    md, text = rendered
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(Path(link).stem for link in links) == sorted(FIGURES)
    for link in links:
        assert not Path(link).is_absolute()
        assert (md.parent / link).is_file(), link
        assert (md.parent / link).with_suffix(".svg").is_file()


def test_paired_difference_matches_a_hand_computation():
    table = pd.DataFrame({
        "run": ["a"] * 3 + ["b"] * 3, "example": [0, 1, 2] * 2, "tokens": [2, 4, 4] * 2,
        "base_loss_sum": [0.0] * 6, "final_loss_sum": [2.0, 4.0, 8.0, 1.0, 4.0, 6.0]})
    d = F.Losses(table).diff("b", "a")
    diffs, tokens = [-1.0, 0.0, -2.0], [2, 4, 4]
    mean = sum(diffs) / sum(tokens)  # token-weighted: -0.3
    resid = [x - mean * n for x, n in zip(diffs, tokens)]
    se = (3 / 2 * sum(r * r for r in resid)) ** 0.5 / sum(tokens)
    assert d["diff"] == pytest.approx(mean) and d["half"] == pytest.approx(4.303 * se) and d["n"] == 3
    assert d["distinguishable"] == (abs(mean) > 4.303 * se)


def test_findings_change_when_the_numbers_change():
    df, ev = _fixture()
    before = F.best_run(df, F.Losses(ev))
    # make lora-r256 clearly the best: lower its loss on every eval example
    df2, ev2 = df.copy(), ev.copy()
    best = df.sort_values("eval_loss")["run"].iloc[0]
    target = "lora-r256" if best != "lora-r256" else "lora-r8"
    ev2.loc[ev2["run"] == target, "final_loss_sum"] *= 0.5
    df2.loc[df2["run"] == target, "eval_loss"] = df["eval_loss"].min() / 2
    after = F.best_run(df2, F.Losses(ev2))
    assert f"`{best}`" in before.split(":")[1][:30]
    assert after.startswith(f"**Lowest eval loss: `{target}`**") and before != after
    # two ranks with identical per-example losses are reported as indistinguishable, not ranked
    ev3 = ev.copy()
    r128 = ev3[ev3["run"] == "lora-r128"]["final_loss_sum"].to_numpy()
    ev3.loc[ev3["run"] == "lora-r256", "final_loss_sum"] = r128
    steps = " ".join(F.rank_steps(df, F.Losses(ev3)))
    assert "r=128 → r=256**: " in steps
    assert "not distinguishable" in steps.split("r=128 → r=256**: ")[1].split(";")[0]


def test_writeup_claims_follow_the_measurements():
    df, ev = _fixture()
    mem, _ = F.memory_measure(df)
    claim = "full fine-tuning used the least peak memory"

    def verdict(frame):
        return {c["claim"]: c["ours"] for c in F.writeup_claims(frame, ev)}[claim]

    low, high = df.copy(), df.copy()
    low.loc[low["run"] == "full", mem] = df[mem].min() * 0.5
    high.loc[high["run"] == "full", mem] = df[mem].max() * 2
    assert verdict(low) == "agrees" and verdict(high) == "disagrees"


def test_w1s_memory_claim_compares_full_finetuning_with_lora_only():
    """W1 trained full fine-tuning and LoRA: a QLoRA run lighter than full fine-tuning does not refute it."""
    df, ev = _fixture()
    mem = F.memory_measure(df)[0]
    m = df.assign(**{mem: df[mem].astype(float)})
    lora = m["run"].str.startswith("lora-")
    m.loc[m["run"] == "full", mem] = m.loc[lora, mem].min() * 0.8  # below every LoRA run
    m.loc[m["run"] == "qlora-r8", mem] = m.loc[lora, mem].min() * 0.5  # a run W1 never trained
    claim = {c["claim"]: c for c in F.writeup_claims(m, ev)}["full fine-tuning used the least peak memory"]
    assert claim["ours"] == "agrees" and "qlora-r8" not in claim["evidence"]


def test_w2s_last_logged_train_loss_sits_beside_our_last_logged_one_not_our_mean():
    from lorasweep.report import writeups_section

    df, ev = _fixture()
    rows = _writeups_rows(writeups_section(F.by_run(df), ev, df))
    w2 = next(r for r in rows if r["source"].startswith("W2") and r["run"] == "lora-r8")
    ours = next(r for r in rows if r["source"].startswith("lorasweep") and r["run"] == "lora-r8")
    r8 = df.set_index("run").loc["lora-r8"]
    assert w2["last train loss"] == "1.72" and w2["train loss"] == "–"  # W2 gives the last logged value only
    assert ours["last train loss"] == f"{r8['train_loss_last']:.4f}" and ours["train loss"] == f"{r8['train_loss']:.4f}"


def test_the_memory_model_table_does_not_round_small_components_to_zero():
    from lorasweep.report import memory_model_section

    df, _ = _fixture()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in memory_model_section(F.by_run(df)).splitlines() if line.startswith("| ")}
    r8 = df.set_index("run").loc["lora-r8"]
    assert rows["lora-r8"][1] == F.mib(r8["predicted_gradients_bytes"])  # 24 KiB, not "0.000 GiB"
    assert rows["lora-r8"][1] != rows["full"][1] and not rows["lora-r8"][1].startswith("0.0")


def test_the_memory_model_table_pairs_each_run_with_its_own_measurement_in_any_row_order():
    from lorasweep.report import memory_model_section

    df, _ = _fixture()
    runs = F.by_run(df)

    def rows(frame):
        return {line.split("|")[1].strip(): line for line in memory_model_section(frame).splitlines()
                if line.startswith("| ") and not line.startswith("| run")}

    assert rows(runs.iloc[::-1]) == rows(runs)  # the index is a label, not a position
    assert rows(runs[runs["run"] != "full"]) == {k: v for k, v in rows(runs).items() if k != "full"}


def _claim(claims: list[dict], source: str, start: str) -> dict:
    """The claim of ``source`` whose text starts with ``start``."""
    return next(c for c in claims if c["source"] == source and c["claim"].startswith(start))


def test_the_diminishing_returns_claim_reads_a_worse_r256_as_no_gain_and_a_large_gain_as_disagreeing():
    """Checked on the train loss each write-up reported (W3: the mean over the run; W2: the last logged)."""
    df, ev = _fixture()

    def verdict(frame, source="W3"):
        return _claim(F.writeup_claims(frame, ev), source, "little gain from r=128 to r=256")["ours"]

    at = df.set_index("run")
    worse, better = df.copy(), df.copy()
    for col in ("train_loss", "train_loss_last"):
        worse.loc[worse["run"] == "lora-r256", col] = at.loc["lora-r128", col] * 1.2
        better.loc[better["run"] == "lora-r256", col] = at.loc["lora-r128", col] * 0.5
    assert verdict(worse) == "agrees (r=256 worse)"  # was "disagrees": |Δ| read as a gain
    assert verdict(worse, "W2") == "agrees (r=256 worse)"  # one seed: no spread to call it measurable by
    two = pd.concat([worse.assign(seed=0), worse.assign(seed=1)], ignore_index=True)  # replicates, no spread
    two.loc[two["seed"] == 1, ["train_loss", "train_loss_last"]] *= 1.001
    assert verdict(two) == verdict(two, "W2") == "agrees (r=256 measurably worse)"
    flat_before = better.copy()  # no gain from r=8 to r=128: any measurable gain after it is not "diminishing"
    flat_before.loc[flat_before["run"] == "lora-r8", "train_loss"] = at.loc["lora-r128", "train_loss"]
    assert verdict(flat_before) == "disagrees"


def test_the_diminishing_returns_claim_cannot_be_checked_without_a_rank_below_128():
    """With ranks 128 and 256 only, a measurable gain from r=128 to r=256 has nothing to be "little" next to."""
    df, ev = _fixture()
    df, ev = df[df["run"] != "lora-r8"].copy(), ev[ev["run"] != "lora-r8"]
    df.loc[df["run"] == "lora-r256", "train_loss"] = df.loc[df["run"] == "lora-r128", "train_loss"].iloc[0] * 0.5
    verdict = _claim(F.writeup_claims(df, ev), "W3", "little gain from r=128 to r=256")["ours"]
    assert verdict.startswith("cannot check")  # was "disagrees"


def test_timing_claims_are_not_checked_with_runs_timed_on_a_busy_machine():
    df, ev = _fixture()
    claim = "training gets slower as the rank grows"

    def claims(frame):
        return {c["claim"]: c["ours"] for c in F.writeup_claims(frame, ev)}

    idle = df.assign(other_processes_cpu_share_pct=0.0)
    assert not claims(idle)[claim].startswith("cannot check")
    busy = idle.copy()
    busy.loc[busy["run"] == "lora-r128", "other_processes_cpu_share_pct"] = 45.0
    assert claims(busy)[claim] == ("cannot check (`lora-r128` timed on a busy machine, other processes taking up to "
                                   "45% of the CPU)")
    assert "rerun them alone" in F.busy_machine(busy)
    everyone = idle.assign(other_processes_cpu_share_pct=50.0)
    assert "Every run trained under an unknown and changing load" in F.busy_machine(everyone)
    steps = F.rank_steps(F.by_run(busy), F.Losses(ev))
    assert ("(not comparable: `lora-r128` timed on a busy machine, other processes taking up to 45% of the CPU)"
            in steps[0])  # r=8 → r=128
    assert "not comparable" not in " ".join(F.rank_steps(F.by_run(idle), F.Losses(ev)))
    # every other timing comparison says so too: the findings' runtime line, QLoRA against LoRA, the trade-offs
    text = " ".join(F.findings(everyone, ev))
    assert "Full fine-tuning's train runtime is" in text and "`qlora-r8` vs `lora-r8`" in text
    for line in F.findings(everyone, ev) + F.tradeoffs(everyone):
        if "runtime" in line and "Timings taken on a busy machine" not in line:
            assert "not comparable" in line, line
    assert not any("not comparable" in line for line in F.findings(idle, ev) + F.tradeoffs(idle))
    assert [("not comparable" in line) for line in F.tradeoffs(busy)] == [
        r.startswith("`lora-r128`") for r in F.tradeoffs(busy)]


def test_on_the_cpu_memory_findings_compare_rss_above_the_process_before_its_model_loaded():
    """A total peak RSS holds what every run holds alike (the Python and torch runtime, the data): within the 2%
    tolerance of a large total, a run that needs 100 MiB more than another would read as "about the same"."""
    df, ev = _fixture()
    base = 6 * 2**30
    added = {"full": 600, "lora-r8": 500, "lora-r128": 550, "lora-r256": 650, "qlora-r8": 450}  # MiB above the start
    runs = df.assign(rss_before_load_bytes=base,
                     peak_rss_bytes=[base + added[r] * 2**20 for r in df["run"]])
    assert F.memory_measure(F.by_run(runs))[0] == "peak_rss_above_start_bytes"
    assert F.memory_measure(F.by_run(df))[0] == "peak_rss_bytes"  # older metrics: the total, as before
    text = " ".join(F.tradeoffs(runs))
    assert "`lora-r8`: " in text and "above the process before its model loaded 17% lower" in text.split("`lora-r128`")[0]


def test_cpu_memory_differences_inside_the_measures_rerun_noise_are_about_the_same():
    """The same run trained again peaked up to ~20 MiB apart on the CPU (benchmarks/rss_noise.py): 10 MiB
    between two runs is no finding there, while on CUDA (allocated bytes, no allocator noise) it is."""
    df, ev = _fixture()
    base = 500 * 2**20
    added = {"full": 60, "lora-r8": 50, "lora-r128": 55, "lora-r256": 100, "qlora-r8": 45}  # MiB above the start
    rss = df.assign(rss_before_load_bytes=base, peak_rss_bytes=[base + added[r] * 2**20 for r in df["run"]])
    text = " ".join(F.tradeoffs(rss)).split("`lora-r128`")[0]
    assert "above the process before its model loaded about the same (−16.7%: within the measure's noise, 24 MiB)" in text
    full = next(f for f in F.full_finetuning(F.by_run(rss), F.Losses(ev)) if f.startswith("Its "))
    assert "higher than `lora-r256`" not in full and "lower than `lora-r256` 100 MiB" in full
    assert "(within 2% or 24 MiB)" in full
    claims = {c["claim"]: c["ours"] for c in F.writeup_claims(rss, ev)}
    assert claims["full fine-tuning used the least peak memory"] == "too close to call (within 2% or 24 MiB)"
    cuda = df.assign(peak_cuda_allocated_bytes=[added[r] * 2**20 for r in df["run"]])
    assert "allocated 17% lower" in " ".join(F.tradeoffs(cuda)).split("`lora-r128`")[0]
    assert F.mem_tol("peak_cuda_allocated_bytes", 2**20) == F.MEM_TOL


def test_a_diverged_run_is_named_and_left_out_of_the_comparisons(tmp_path):
    df, ev = _fixture()
    nan_run = df.assign(train_logs=10, train_nonfinite_logs=0)
    nan_run.loc[nan_run["run"] == "lora-r8", ["eval_loss", "train_nonfinite_logs"]] = [float("nan"), 9]
    out = F.findings(nan_run, ev)
    assert out[0].startswith("**Training diverged**: `lora-r8`: eval loss nan, 9 of 10 training logs")
    assert not any("nan" in f.replace("nano", "") for f in out[1:])  # no comparison with a NaN
    assert not any(f.startswith(("**Lowest eval loss: `lora-r8`", "**r=8 →")) for f in out)
    assert not any(re.search(r"(?<!q)lora-r8\b", c["evidence"]) for c in F.writeup_claims(nan_run, ev))
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVGs
        md, text = _render(tmp_path, metrics=nan_run)
    assert "**Training diverged**" in text
    for figure in ("loss_curves", "tradeoff"):  # the run draws nothing there: its legend entry says why
        assert "lora-r8 (diverged: loss not finite)" in (md.parent / "figures" / f"{figure}.svg").read_text()
    # a run whose gradient norm went non-finite for a while but ended with a finite eval loss: named, still compared
    wobbly = df.assign(train_logs=10, train_nonfinite_logs=0)
    wobbly.loc[wobbly["run"] == "lora-r128", "train_nonfinite_logs"] = 3
    out = F.findings(wobbly, ev)
    assert out[0].startswith("**Training diverged**: `lora-r128`: 3 of 10 training logs")
    assert any("`lora-r128`" in f for f in out[1:])
    # metrics from before these columns existed, or a sweep without trouble: no such finding
    assert not F.findings(df, ev)[0].startswith("**Training diverged")
    assert not F.findings(df.assign(train_logs=10, train_nonfinite_logs=0), ev)[0].startswith("**Training diverged")


def test_a_run_worse_than_untrained_is_called_out():
    df, ev = _fixture()
    assert "Worse than untrained" not in F.learning(F.by_run(df), F.Losses(ev))
    worse_df, worse_ev = df.copy(), ev.copy()
    rows = worse_ev["run"] == "lora-r128"
    worse_ev.loc[rows, "final_loss_sum"] = worse_ev.loc[rows, "base_loss_sum"] * 1.5
    worse_df.loc[worse_df["run"] == "lora-r128", "eval_loss"] = df["base_eval_loss"].max() * 1.5
    text = F.learning(F.by_run(worse_df), F.Losses(worse_ev))
    assert "**Worse than untrained**: `lora-r128` (95% paired interval above zero)" in text
    # a change that rounds to nothing has no sign
    flat = df.assign(eval_loss=df["base_eval_loss"] + 0.0002 * (df["run"] == "full"))
    assert "(−0.000)" not in F.learning(F.by_run(flat), F.Losses(ev))
    assert "(+0.000)" in F.learning(F.by_run(df.assign(eval_loss=df["base_eval_loss"] - 0.0002)), F.Losses(ev))


def test_report_renders_without_per_example_losses(tmp_path):
    """Older results without eval_losses.csv still render; findings then say significance is unknown."""
    df, ev = _fixture()
    md, text = _render(tmp_path, eval_losses=ev.iloc[0:0])
    assert "significance unknown" in text
    assert json.loads((md.parent / "summary.ipynb").read_text())["cells"]


def test_the_report_kernel_runs_encrypted_and_logs_no_warning_of_it(tmp_path, capfd):
    """papermill's kernel talked over loopback TCP in the clear and said so on the job's stderr (logs/report.log):
    "[IPKernelApp] WARNING | Kernel is running over TCP without encryption". Its channels are now encrypted."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nb.cells = [nbformat.v4.new_code_cell("from ipykernel.kernelapp import IPKernelApp\n"
                                          "print(IPKernelApp.instance().curve_secretkey is not None)")]
    nbformat.write(nb, tmp_path / "t.ipynb")
    render_report(tmp_path / "t.ipynb", tmp_path / "out.ipynb", tmp_path / "out.md")
    cell = nbformat.read(tmp_path / "out.ipynb", 4).cells[-1]  # after papermill's parameters cell
    assert cell.outputs[0]["text"].strip() == "True"  # the kernel was given its CurveZMQ key
    assert "without encryption" not in capfd.readouterr().err


def test_the_report_renders_in_an_ascii_locale(tmp_path):
    """On a machine whose locale is not UTF-8 (LANG=C with Python's UTF-8 mode off, or a Latin-1 one) the report's
    Markdown (its ±, −, →) was written in the locale's encoding: UnicodeEncodeError, the sweep's last job failed."""
    import subprocess
    import sys

    shutil.copytree(FIXTURE, tmp_path / "results")
    code = ("import sys; from lorasweep.report import render_report; r = sys.argv[2] + '/results/'; "
            "render_report(sys.argv[1], sys.argv[2] + '/summary.ipynb', sys.argv[2] + '/summary.md', "
            "metrics_csv=r + 'metrics.csv', history_csv=r + 'log_history.csv', eval_losses_csv=r + 'eval_losses.csv', "
            "data_summary=r + 'summary.json', experiment='fixture')")
    proc = subprocess.run([sys.executable, "-c", code, str(TEMPLATE), str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "±" in text and "→" in text


def test_plots_and_report_log_no_warning_where_the_home_folder_cannot_be_written(tmp_path):
    """A home folder that cannot be written (read-only or missing, as on cluster nodes and in containers): matplotlib
    warned in logs/plot.log to set MPLCONFIGDIR, IPython twice in logs/report.log that its parent folder is not
    writable, each working from a new temporary folder. The jobs now use folders of the working directory."""
    import subprocess
    import sys

    shutil.copytree(FIXTURE, tmp_path / "results")
    home = tmp_path / "home"
    home.write_text("")  # a file: no folder can be made under it, whoever runs the test
    code = ("from lorasweep.plots import plot_all; from lorasweep.report import render_report; r = 'results/'; "
            "plot_all(r + 'metrics.csv', r + 'log_history.csv', 'reports/figures'); "
            "render_report(sys.argv[1], 'reports/summary.ipynb', 'reports/summary.md', metrics_csv=r + 'metrics.csv', "
            "history_csv=r + 'log_history.csv', eval_losses_csv=r + 'eval_losses.csv', data_summary=r + 'summary.json', "
            "experiment='fixture')")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "IPYTHONDIR", "XDG_CONFIG_HOME",
                                                            "XDG_CACHE_HOME")}
    proc = subprocess.run([sys.executable, "-c", "import sys; " + code, str(TEMPLATE)], capture_output=True, text=True,
                          env={**env, "HOME": str(home)}, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MPLCONFIGDIR" not in proc.stderr and "not a writable location" not in proc.stderr, proc.stderr
    assert (tmp_path / "reports" / "summary.md").exists()
    assert sorted(p.name for p in (tmp_path / ".snakemake" / "lorasweep-home").iterdir()) == ["ipythondir",
                                                                                             "mplconfigdir"]



def _plot_in_a_subprocess(tmp_path, home, cwd, report=False):
    """plot_all (``report``: render_report) on the fixture in a fresh process, with ``home`` as HOME."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "IPYTHONDIR", "XDG_CONFIG_HOME",
                                                            "XDG_CACHE_HOME")}
    r = str(FIXTURE)
    code = ("import sys; from lorasweep.report import render_report; r = sys.argv[1]; render_report(sys.argv[2], "
            "sys.argv[3] + '/summary.ipynb', sys.argv[3] + '/summary.md', metrics_csv=r + '/metrics.csv', "
            "history_csv=r + '/log_history.csv', eval_losses_csv=r + '/eval_losses.csv', "
            "data_summary=r + '/summary.json', experiment='fixture')" if report else
            "import sys; from lorasweep.plots import plot_all; r = sys.argv[1]; "
            "plot_all(r + '/metrics.csv', r + '/log_history.csv', sys.argv[3] + '/figures')")
    return subprocess.run([sys.executable, "-c", code, r, str(TEMPLATE), str(tmp_path)], capture_output=True,
                          text=True, env={**env, "HOME": str(home)}, cwd=cwd, timeout=300)


def test_plots_are_drawn_where_neither_the_home_folder_nor_the_working_directory_can_be_written(tmp_path):
    """plot_all called from a folder that cannot be written (a script or notebook outside the workflow), the home
    folder read-only too: making the working directory's .snakemake/lorasweep-home failed, and the plots with it,
    where matplotlib alone would only have warned and used a temporary folder."""
    home = tmp_path / "home"
    home.write_text("")  # a file: no folder can be made under it, whoever runs the test
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / ".snakemake").write_text("")  # nor under the working directory
    proc = _plot_in_a_subprocess(tmp_path, home, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "figures" / "loss_curves.png").exists()


def test_the_plots_and_the_report_make_no_folder_in_the_home_folder_their_libraries_would_not(tmp_path):
    """The plot job checked IPython's home folder too, and so made ~/.ipython, which nothing it runs uses; the
    report job made matplotlib's ~/.config/matplotlib and ~/.cache/matplotlib, where its kernel draws nothing."""
    home = tmp_path / "home"
    home.mkdir()
    proc = _plot_in_a_subprocess(tmp_path, home, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in home.iterdir()) == [".cache", ".config"]  # matplotlib's own, as before
    shutil.rmtree(home)
    home.mkdir()
    proc = _plot_in_a_subprocess(tmp_path, home, tmp_path, report=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in home.iterdir()) == [".ipython"]  # the kernel's own
    assert not (tmp_path / ".snakemake").exists()


def _two_seeds():
    """The fixture as if every run had been trained with seeds 0 and 1 (seed 1: shifted losses and times)."""
    m, ev = _fixture()
    m1 = m.assign(seed=1, eval_loss=m["eval_loss"] + 0.02, train_runtime_s=m["train_runtime_s"] * 1.1)
    ev1 = ev.assign(seed=1, final_loss_sum=ev["final_loss_sum"] + 0.02 * ev["tokens"])
    return pd.concat([m.assign(seed=0), m1], ignore_index=True), pd.concat([ev.assign(seed=0), ev1], ignore_index=True)


def test_replicates_are_aggregated_to_mean_and_sd_per_run():
    m, _ = _fixture()
    m2, _ = _two_seeds()
    agg = F.by_run(m2)
    assert list(agg["run"]) == list(m["run"]) and (agg["n_seeds"] == 2).all() and (agg["seeds"] == "0,1").all()
    assert agg["eval_loss"].tolist() == pytest.approx((m["eval_loss"] + 0.01).tolist())
    assert agg["eval_loss_sd"].tolist() == pytest.approx([0.02 / 2**0.5] * len(m))
    assert F.pm(agg.iloc[0], "eval_loss") == f"{agg['eval_loss'].iloc[0]:.4f} ± 0.0141"
    single = F.by_run(m)
    assert single["eval_loss"].tolist() == m["eval_loss"].tolist() and single["eval_loss_sd"].isna().all()
    assert F.pm(single.iloc[0], "eval_loss") == f"{m['eval_loss'].iloc[0]:.4f}"


def test_a_column_some_seeds_lack_says_how_many_seeds_its_mean_is_over():
    """Seeds trained by different lorasweep versions (a seed added later, the others kept): a column the older
    metrics lack is a mean over the seeds that have it. Its cells say so ("(2 of 3 seeds)"), and the seeds' spread
    widens a comparison with the count of seeds behind it, not the run's."""
    from lorasweep import report

    m2, _ = _two_seeds()
    m, _ = _fixture()
    old = m.assign(seed=2, eval_loss=m["eval_loss"] + 0.01, train_runtime_s=float("nan"))  # predates the column
    agg = F.by_run(pd.concat([m2, old], ignore_index=True))
    assert (agg["n_seeds"] == 3).all() and (agg["train_runtime_s_n"] == 2).all()
    assert "eval_loss_n" not in agg  # every seed has it: no count
    row = agg.iloc[0]
    assert F.pm(row, "train_runtime_s", "{:.1f}").endswith(" (2 of 3 seeds)")
    assert F.pm(row, "eval_loss").count("±") == 1 and "seeds)" not in F.pm(row, "eval_loss")
    assert "(2 of 3 seeds)" in report.results_table(agg)
    runs = agg.set_index("run")
    a, b = runs.index[0], runs.index[1]
    sa, sb = runs.loc[a, "train_runtime_s_sd"], runs.loc[b, "train_runtime_s_sd"]
    rel = F.t975(1) * math.sqrt(sa**2 / 2 + sb**2 / 2) / runs.loc[a, "train_runtime_s"]
    assert F.seed_tol(runs, "train_runtime_s", a, b, 1e-9)[0] == pytest.approx(rel)


def test_a_seed_whose_loss_is_not_a_number_is_no_mean_over_the_other_seeds():
    """A seed that diverged (eval loss NaN) makes its run's losses NaN (STRICT_MEAN), not a mean over the other
    seeds: the results table said "nan ± 0.0071 (2 of 3 seeds)", as if the NaN were the mean of two seeds. A
    column the older seeds lack still says how many seeds its mean is over."""
    from lorasweep import report

    m, _ = _fixture()
    per_seed = pd.concat([m.assign(seed=s, eval_loss=m["eval_loss"] + 0.01 * s) for s in (0, 1, 2)],
                         ignore_index=True)
    lost = (per_seed["run"] == "lora-r128") & (per_seed["seed"] == 2)
    per_seed.loc[lost, ["eval_loss", "train_loss", "eval_perplexity"]] = float("nan")
    per_seed.loc[per_seed["seed"] == 2, "train_runtime_s"] = float("nan")  # predates the column
    agg = F.by_run(per_seed)
    assert pd.isna(agg.set_index("run").loc["lora-r128", "eval_loss"])
    assert not {"eval_loss_n", "train_loss_n", "eval_perplexity_n"} & set(agg.columns)
    row = next(line for line in report.results_table(agg).splitlines() if line.startswith("| lora-r128 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert "seeds)" not in cells[1] and "seeds)" not in cells[2], cells
    assert cells[4].endswith(" (2 of 3 seeds)"), cells


def test_seed_spread_widens_the_interval_and_can_make_runs_indistinguishable():
    m, ev = _fixture()
    one = F.Losses(ev).diff("lora-r8", "qlora-r8")
    assert one["seeds"] == (1, 1)
    # two seeds whose losses disagree by as much as the two runs differ: no longer distinguishable
    gap = one["diff"]
    ev2 = pd.concat([ev.assign(seed=0), ev.assign(seed=1, final_loss_sum=ev["final_loss_sum"] - 3 * gap * ev["tokens"]
                                                   * (ev["run"] == "lora-r8"))], ignore_index=True)
    two = F.Losses(ev2).diff("lora-r8", "qlora-r8")
    assert two["seeds"] == (2, 2) and two["half"] > one["half"]
    assert one["distinguishable"] and not two["distinguishable"]
    assert "and 2 seeds each" in F.ci_text(two)


def test_bar_figures_draw_error_bars_only_with_replicates():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorasweep.plots import _bar, run_palette

    m, _ = _fixture()
    m2, _ = _two_seeds()
    runs = list(m["run"])
    counts = []
    for df in (m, m2):
        fig, ax = plt.subplots()
        _bar(ax, df, "train_runtime_s", run_palette(runs), "runtime", runs)
        counts.append(len(ax.lines))
        plt.close(fig)
    assert counts[0] == 0 and counts[1] >= len(runs)  # one error bar (with caps) per run


def test_report_with_two_seeds_shows_spread(tmp_path):
    m2, ev2 = _two_seeds()
    _, text = _render(tmp_path, m2, ev2)
    assert "each trained with 2 seeds (0,1" in text
    results = text.split("## Results")[1].split("\n## ")[0]
    assert results.count(" ± ") >= 4 * len(m2["run"].unique())  # train / eval loss, runtime, tokens/s
    assert "seed-to-seed variation of training (Student's t" in text


def test_runs_that_shared_their_gpu_are_flagged_by_run_and_seed():
    m, ev = _two_seeds()
    assert not any("shared their GPU" in f for f in F.findings(m, ev))
    m["gpu_jobs_beside_max"] = float("nan")  # not shared out (one job per GPU): no warning either
    assert not any("shared their GPU" in f for f in F.findings(m, ev))
    m.loc[(m["run"] == "lora-r8") & (m["seed"] == 1), "gpu_jobs_beside_max"] = 3
    m.loc[m["run"] == "full", "gpu_jobs_beside_max"] = 0  # claimed a slot, nobody beside it
    warning = F.findings(m, ev)[0]
    assert warning.startswith("**Runs that shared their GPU**: `lora-r8` (seed 1) beside up to 3 other")
    assert "`full`" not in warning and "jobs_per_gpu: 1" in warning
    m["gpu_jobs_beside_max"] = 4
    assert F.findings(m, ev)[0].startswith("**Runs that shared their GPU**: every run, each beside up to 4 other")


def test_the_rendered_report_names_the_seed_that_diverged_shared_its_gpu_or_ran_on_a_busy_machine(tmp_path):
    """The report's findings look at every seed before averaging: one diverged seed is not averaged away."""
    m, ev = _two_seeds()
    m = m.assign(train_logs=10, train_nonfinite_logs=0, gpu_jobs_beside_max=float("nan"),
                 other_processes_cpu_share_pct=1.0)
    one = lambda run, seed: (m["run"] == run) & (m["seed"] == seed)  # noqa: E731
    m.loc[one("lora-r8", 1), ["eval_loss", "train_nonfinite_logs"]] = [float("nan"), 4]
    m.loc[one("lora-r128", 0), "gpu_jobs_beside_max"] = 2
    m.loc[one("lora-r256", 1), "other_processes_cpu_share_pct"] = 30.0  # averaged with seed 0: 15.5%
    _, text = _render(tmp_path, m, ev)
    findings = text.split("## Findings")[1].split("\n## ")[0]
    assert "**Training diverged**: `lora-r8` (seed 1): eval loss nan, 4 of 10 training logs" in findings
    assert "**Runs that shared their GPU**: `lora-r128` (seed 0) beside up to 2 other" in findings
    assert "30% of the CPU while `lora-r256` (seed 1) trained" in findings
    assert "**Lowest eval loss: `lora-r8`" not in findings
    # the results table does not average the diverged seed away either
    results = text.split("## Results")[1].split("\n## ")[0]
    row = next(line for line in results.splitlines() if line.startswith("| lora-r8 "))
    assert "nan" in row.lower() or "–" in row
    assert F.by_run(m).set_index("run").loc["lora-r8", "eval_loss"] != F.by_run(m).set_index("run").loc[
        "lora-r8", "eval_loss"]  # NaN
    assert F.by_run(m).set_index("run").loc["full", "eval_loss"] == pytest.approx(
        m[m["run"] == "full"]["eval_loss"].mean())


def test_the_rank_verdict_follows_the_sign_and_the_intervals_of_each_step():
    # (rank from, rank to, change in eval loss, distinguishable, 95% half-width)
    better_then_flat = [(8, 128, -0.10, True, 0.02), (128, 256, -0.005, False, 0.02)]
    assert F.returns_verdict(better_then_flat).startswith("**Diminishing returns**: r=8 → 128 lowered")
    worse_then_flat = [(8, 128, +0.10, True, 0.02), (128, 256, -0.005, False, 0.02)]
    verdict = F.returns_verdict(worse_then_flat)
    assert "Diminishing" not in verdict and "lowered" not in verdict and "+0.1000" in verdict
    # per doubling: 0.10 / 4 = 0.025 against 0.02 / 1: the difference is inside the intervals' sum
    close = [(8, 128, -0.10, True, 0.02), (128, 256, -0.02, True, 0.01)]
    assert F.returns_verdict(close).startswith("**No measurable change in returns**")
    clear = [(8, 128, -0.40, True, 0.02), (128, 256, -0.02, True, 0.01)]
    assert F.returns_verdict(clear).startswith("**Diminishing returns**: per doubling")
    rising = [(8, 128, -0.04, True, 0.004), (128, 256, -0.05, True, 0.004)]
    assert F.returns_verdict(rising).startswith("**No sign of diminishing returns**")


def test_full_finetunings_memory_is_called_lowest_only_when_no_run_is_within_the_tolerance():
    df, ev = _fixture()
    mem, _ = F.memory_measure(df)
    df[mem] = df[mem].astype(float)
    full = df.loc[df["run"] == "full", mem].iloc[0]

    def sentence(frame):
        return next(f for f in F.full_finetuning(F.by_run(frame), F.Losses(ev)) if f.startswith("Its "))

    lowest = df.copy()
    lowest.loc[lowest["run"] != "full", mem] = full * 1.5
    assert "the **lowest** of all runs" in sentence(lowest)
    close = lowest.copy()
    close.loc[close["run"] == "lora-r8", mem] = full * 0.99  # 1% below full: within the 2% tolerance
    text = sentence(close)
    assert "lowest" not in text and "lower than `lora-r128`" in text
    assert "about the same as `lora-r8`" in text
    highest = df.copy()
    highest.loc[highest["run"] != "full", mem] = full * 0.5
    highest.loc[highest["run"] == "lora-r8", mem] = full * 1.01
    text = sentence(highest)
    assert "highest" not in text and "every adapter run needs less" not in text
    assert "higher than `lora-r128`" in text and "about the same as `lora-r8`" in text


def test_timings_of_short_single_runs_come_with_a_caution():
    m, ev = _fixture()
    ctx = {"metrics": F.by_run(m), "eval_losses": ev}
    from lorasweep.report import findings_section

    assert "trained for under 60 s each" in findings_section(ctx)  # the fixture's tiny runs: seconds
    one_long = m.copy()
    one_long.loc[one_long["run"] == "lora-r128", "train_runtime_s"] = 61.9
    text = findings_section({"metrics": F.by_run(one_long), "eval_losses": ev})
    assert "Most of these runs trained for under 60 s (median" in text and "under 60 s each" not in text
    long = F.by_run(m.assign(train_runtime_s=m["train_runtime_s"] * 100))
    assert "trained for under" not in findings_section({"metrics": long, "eval_losses": ev})
    two, ev2 = _two_seeds()
    assert "trained for under" not in findings_section({"metrics": F.by_run(two), "eval_losses": ev2})


def test_results_show_mfu_and_its_bound_on_a_gpu_and_neither_on_the_cpu():
    from lorasweep.report import results_table

    m, _ = _fixture()
    assert "MFU" not in results_table(F.by_run(m))  # the fixture's runs are CPU runs
    gpu = m.assign(mfu_pct=[2.5, 0.9, 0.8, 0.7, 0.6], mfu_ceiling_pct=[24.6, 55.5, 55.4, 55.3, 57.5])  # 5 runs
    table = results_table(F.by_run(gpu))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    header, full = rows[0], next(r for r in rows if r[0] == "full")
    assert full[header.index("MFU")] == "2.5%" and full[header.index("MFU bound")] == "25%"
    assert "*MFU bound*: the most MFU this GPU allows" in table
    # sizes in the unit that fits, as the findings write them: a small adapter is not "0.02 MiB"
    sized = m.assign(saved_model_bytes=[1_326_000_000, 25_600, 6_300_000, 12_600_000, 25_600])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in results_table(F.by_run(sized)).splitlines()
            if line.startswith("| ")]
    saved = {r[0]: r[rows[0].index("saved")] for r in rows[1:]}
    assert saved == {"full": "1.23 GiB", "lora-r8": "25 KiB", "lora-r128": "6.01 MiB", "lora-r256": "12 MiB",
                     "qlora-r8": "25 KiB"}


def test_the_results_say_how_the_lora_runs_stored_their_frozen_base_and_warn_when_they_differ():
    """training.frozen_weights_16bit is operational: runs finished before it changed keep their base's storage, so
    a sweep can hold both, and its memory figures would compare unlike runs unless the report says so."""
    from lorasweep.report import results_table

    m, _ = _fixture()
    lora = m["method"] == "lora"
    assert lora.sum() >= 2 and "frozen" not in results_table(F.by_run(m))  # CPU fp32 runs: nothing to say
    gpu = m.assign(precision="bf16", frozen_16bit_params=lora * 1000)
    assert "The LoRA runs kept their frozen linear weights in 16 bits" in results_table(F.by_run(gpu))
    first = m.loc[lora, "run"].iloc[0]
    gpu.loc[gpu["run"] == first, "frozen_16bit_params"] = 0
    table = results_table(F.by_run(gpu))
    assert "**Memory compares unlike runs**" in table and f"in 16 bits, `{first}` in fp32" in table
    # a DoRA run keeps in fp32 only the bases of the layers DoRA adapts: said, and no warning
    gpu.loc[gpu["run"] == first, ["use_dora", "frozen_16bit_params"]] = [True, 500]
    table = results_table(F.by_run(gpu))
    assert "unlike runs" not in table and f"`{first}` kept the base of each layer DoRA adapts in fp32" in table
    # DoRA on every linear layer (all-linear) leaves nothing to convert: its 0 says nothing about the setting
    gpu.loc[gpu["run"] == first, "frozen_16bit_params"] = 0
    table = results_table(F.by_run(gpu))
    assert "unlike runs" not in table and "The LoRA runs kept their frozen linear weights in 16 bits" in table



def test_the_results_say_that_bf16_on_the_cpu_fills_the_rss_with_kernels_not_training_state():
    """bf16 autocast on the CPU: oneDNN keeps kernels per batch shape and the RSS grows with each new length (the
    tiny preset's lora-r8 266 MiB above its load footprint against 56 in fp32), which the memory figures then hold;
    the report says so for such runs, and says nothing for fp32 ones or 16-bit ones on a GPU."""
    from lorasweep.report import results_table

    m, _ = _fixture()
    assert "Peak RSS in 16 bits on the CPU" not in results_table(F.by_run(m))  # CPU fp32
    table = results_table(F.by_run(m.assign(precision="bf16")))
    assert "- **Peak RSS in 16 bits on the CPU**: `full`, `lora-r8`" in table and "fp32 sweep on the CPU" in table
    assert "Peak RSS in 16 bits" not in results_table(F.by_run(m.assign(precision="bf16", device="cuda")))


def test_the_results_say_how_the_qlora_runs_fed_their_4bit_layers_and_warn_when_they_differ():
    """QLoRA's 4-bit layers fed 16 bits (training.frozen_weights_16bit), or bitsandbytes' fp32 outputs: the setting
    off everywhere (said plainly), a run from before lorasweep fed them or a mixed sweep (a warning and what to
    rerun), DoRA on every layer (nothing to feed: nothing said)."""
    from lorasweep.report import _frozen_base_note, results_table

    m, _ = _fixture()
    qlora = m["method"] == "qlora"
    assert qlora.sum() == 1 and not any("QLoRA" in line for line in _frozen_base_note(F.by_run(m)))  # fp32 runs
    second = m[qlora].assign(run="qlora-r16", rank=16)
    gpu = pd.concat([m, second], ignore_index=True).assign(precision="bf16")
    qlora = gpu["method"] == "qlora"

    def note(df):
        return "\n".join(line for line in _frozen_base_note(F.by_run(df)) if "QLoRA" in line)

    fed = gpu.assign(four_bit_16bit_layers=qlora * 12)
    assert note(fed).startswith("- The QLoRA runs fed their 4-bit layers 16-bit inputs") and "DoRA" not in note(fed)
    assert note(fed) in results_table(F.by_run(fed))
    off = gpu.assign(four_bit_16bit_layers=0)
    assert "returned their 4-bit layers' outputs in fp32" in note(off) and "**" not in note(off)
    older = gpu.drop(columns=[c for c in ("four_bit_16bit_layers",) if c in gpu])  # a sweep from before it
    assert note(older).startswith("- **QLoRA's memory counts fp32 activations**: `qlora-r8`, `qlora-r16`: ")
    assert "trained before lorasweep fed those layers 16 bits" in note(older) and "--forcerun" in note(older)
    mixed = fed.copy()
    mixed.loc[mixed["run"] == "qlora-r16", "four_bit_16bit_layers"] = 0
    assert note(mixed).startswith("- **QLoRA's memory counts fp32 activations**: `qlora-r16`: ")
    assert "frozen_weights_16bit: false" in note(mixed) and "before lorasweep" not in note(mixed)
    # DoRA: the layers it adapts keep fp32 outputs; on every layer nothing is fed, and nothing is said
    dora = fed.assign(use_dora=qlora)
    assert "the layers DoRA adapts in `qlora-r8`, `qlora-r16` return fp32" in note(dora)
    assert note(dora.assign(four_bit_16bit_layers=0)) == ""



def test_a_gpu_sweep_far_below_its_speed_bound_says_that_overhead_set_the_pace():
    m, ev = _fixture()
    assert not any("Speed against what the GPU allows" in f for f in F.findings(m, ev))  # CPU runs: no bound
    rate = m["train_tokens_nonpad_per_s"]
    gpu = m.assign(tokens_per_s_ceiling=rate * 20, mfu_pct=1.5, mfu_ceiling_pct=30.0)
    bound = next(f for f in F.findings(gpu, ev) if f.startswith("**Speed against what the GPU allows**"))
    assert f"`full` {rate[0]:,.0f} of {rate[0] * 20:,.0f} tokens/s (5%; MFU 1.5% of ≤ 30%)" in bound
    assert "per-step overhead" in bound
    # one run near its bound: no claim that overhead set every run's pace
    gpu.loc[gpu["run"] == "full", "tokens_per_s_ceiling"] = rate[0] * 2
    bound = next(f for f in F.findings(gpu, ev) if f.startswith("**Speed against what the GPU allows**"))
    assert "(50%;" in bound and "per-step overhead" not in bound


def test_the_setup_names_the_commit_of_every_run_and_says_when_it_is_unknown(tmp_path):
    """Provenance from metrics.csv: a run retrained at another commit or from a dirty tree is named; runs trained
    outside a git checkout (git_commit empty) give no 'nan' commit."""
    from lorasweep.report import load, setup_section

    def software(metrics):
        metrics.to_csv(tmp_path / "m.csv", index=False)
        ctx = load(tmp_path / "m.csv", FIXTURE / "log_history.csv", FIXTURE / "summary.json")
        return next(line for line in setup_section(ctx).splitlines() if "**Software**" in line)

    m, _ = _fixture()
    m["git_dirty"] = False
    assert software(m).endswith("; workflow commit `2cd01844e9`.")
    m.loc[m["run"] == "lora-r128", ["git_commit", "git_dirty"]] = ["abcdef1234567", True]
    line = software(m)
    assert "workflow commits `2cd01844e9` (`full`, `lora-r8`, `lora-r256`, `qlora-r8`), `abcdef1234` (`lora-r128`)" in line
    assert line.endswith("trained with uncommitted changes: `lora-r128`.")
    m["git_dirty"] = True
    assert software(m).endswith("(`lora-r128`) with uncommitted changes.")
    m["git_commit"], m["git_dirty"] = None, None
    line = software(m)
    assert "nan" not in line and line.endswith("workflow commit unknown (not trained from a git checkout).")


def test_the_setup_names_a_hub_datasets_revision_and_commit(tmp_path):
    import json

    from lorasweep.report import load, setup_section

    m, _ = _fixture()
    m.to_csv(tmp_path / "m.csv", index=False)

    def dataset(**summary):
        data = {**json.loads((FIXTURE / "summary.json").read_text()), **summary}
        (tmp_path / "summary.json").write_text(json.dumps(data))
        ctx = load(tmp_path / "m.csv", FIXTURE / "log_history.csv", tmp_path / "summary.json")
        return next(line for line in setup_section(ctx).splitlines() if "**Dataset**" in line)

    assert dataset(source="org/data", revision=None, commit="a" * 40).startswith(
        "- **Dataset**: `org/data` (commit `aaaaaaaaaa`): ")
    assert dataset(source="org/data", revision="v2", commit="b" * 40).startswith(
        "- **Dataset**: `org/data` at revision `v2` (commit `bbbbbbbbbb`): ")
    assert dataset(source="org/data", revision="c" * 40, commit="c" * 40).startswith(
        f"- **Dataset**: `org/data` at revision `{'c' * 40}`: ")
    assert dataset(source="data.json").startswith("- **Dataset**: `data.json`: ")  # a summary from before
    assert dataset(source="mine.jsonl", fields={"instruction": "question", "input": None, "output": "answer"}
                   ).startswith("- **Dataset**: `mine.jsonl` (fields instruction ← `question`, input ← none, "
                                "output ← `answer`): ")


def test_rerun_commands_name_the_snakefile_when_snakemake_would_not_find_it():
    """Run elsewhere (README: --directory other-dir --snakefile $PWD/Snakefile), the commands need the Snakefile."""
    from lorasweep.report import rerun_section

    text = rerun_section(None, ["../lorasweep/config/tiny.yaml"], "../lorasweep/Snakefile")
    assert ("snakemake reports/summary.md --cores 4 --resources gpu=1 --snakefile ../lorasweep/Snakefile "
            "--configfile ../lorasweep/config/tiny.yaml") in text
    assert "--snakefile" not in rerun_section(None, ["config/tiny.yaml"])


def test_rerun_commands_quote_paths_with_spaces_and_keep_the_config_overrides():
    """A checkout or config file in a folder with a space, and --config values: the commands run as printed."""
    import shlex

    from lorasweep.report import rerun_section

    text = rerun_section(None, ["../my sweeps/tiny.yaml", "über.yaml"], "../lorasweep copy/Snakefile",
                         {"seed": 1, "experiment": "x y", "seeds": None})
    line = next(x for x in text.splitlines() if x.startswith("snakemake reports/summary.md"))
    assert shlex.split(line.split("   # ")[0]) == [
        "snakemake", "reports/summary.md", "--cores", "4", "--resources", "gpu=1",
        "--snakefile", "../lorasweep copy/Snakefile", "--config", "seed=1", "experiment=x y", "seeds=",
        "--configfile", "../my sweeps/tiny.yaml", "über.yaml"]


def test_a_sweep_without_adapters_shows_its_samples_without_an_adapters_heading(tmp_path):
    from lorasweep.report import adapters_section

    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([{"instruction": "Add two numbers", "input": "", "reference": "a + b",
                                    "completions": {"base": "x", "full": "a + b"}}]))
    full_only = adapters_section([], None, str(samples))
    assert full_only.startswith("## Samples") and "Adapters after training" not in full_only
    assert "`a + b`" in full_only
    verify = tmp_path / "verify.json"
    verify.write_text(json.dumps({"run": "lora-r8", "merged_onto": "base", "max_abs_logit_diff": 1e-6,
                                  "tolerance": 1e-3, "within_tolerance": True, "greedy_identical_count": 3,
                                  "prompts": 3, "eval_loss_adapter": 1.0, "eval_loss_merged": 1.0}))
    with_adapters = adapters_section([str(verify)], None, str(samples))
    assert with_adapters.startswith("## Adapters after training") and "### Samples" in with_adapters
    assert adapters_section([], None, None) == ""
    # after 16-bit training, an adapter beyond the coarse bound is marked, not failed
    verify.write_text(json.dumps({**json.loads(verify.read_text()), "eval_loss_in_training": 1.1,
                                  "adapter_as_trained": False}))
    assert "| 1.10000 (**differs**) |" in adapters_section([str(verify)], None, str(samples))


def test_the_quantization_finding_reads_qlora_against_lora_in_that_direction():
    """qlora-rN against lora-rN: a QLoRA run using half the memory is 'lower', one with a higher loss on every
    eval example shows the loss going from lora-r8's to qlora-r8's with a positive, distinguishable change."""
    df, ev = _fixture()
    df = df.assign(other_processes_cpu_share_pct=0.0)
    mem, _ = F.memory_measure(df)
    df.loc[df["run"] == "qlora-r8", mem] = df.loc[df["run"] == "lora-r8", mem].iloc[0] * 0.5
    ev = ev.copy()
    lora = ev[ev["run"] == "lora-r8"].set_index("example")["final_loss_sum"]
    q = ev["run"] == "qlora-r8"
    ev.loc[q, "final_loss_sum"] = ev.loc[q, "example"].map(lora).to_numpy() + ev.loc[q, "tokens"].to_numpy() * 0.5
    [line] = F.quantization(df, F.Losses(ev))
    m = df.set_index("run")
    assert line.startswith("**4-bit (nf4) `qlora-r8` vs `lora-r8`**") and " 50% lower (" in line, line
    loss = line.split("; eval loss ")[1]
    assert loss.startswith(f"{m.loc['lora-r8', 'eval_loss']:.4f} → {m.loc['qlora-r8', 'eval_loss']:.4f}"), loss
    assert "(Δ +0.5000 ± " in loss and "a real difference" in loss, loss


def test_the_perplexity_of_several_seeds_is_that_of_their_mean_loss():
    """The tables show mean eval loss and perplexity side by side: exp(mean loss), not the mean of exp."""
    import math

    df = pd.DataFrame({"run": ["full", "full", "lora-r8", "lora-r8"], "seed": [0, 1, 0, 1],
                       "eval_loss": [1.0, 3.0, 2.0, float("nan")]})
    df["eval_perplexity"] = df["eval_loss"].map(math.exp)
    m = F.by_run(df).set_index("run")
    assert m.loc["full", "eval_perplexity"] == pytest.approx(math.exp(2.0))  # not (e + e^3) / 2 = 11.4
    assert math.isnan(m.loc["lora-r8", "eval_perplexity"])  # a NaN seed leaves the run's loss NaN, and this


def test_the_tradeoff_figure_plots_the_memory_the_findings_compare():
    """On the CPU: the peak above the process before its model loaded (the findings' measure), not the total
    with the runtime every run holds alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from lorasweep.plots import _tradeoff_figure, run_palette

    per_seed = _fixture()[0]
    df = F.by_run(per_seed.assign(rss_before_load_bytes=per_seed["peak_rss_bytes"].min() * 0.8))
    mem = F.memory_measure(df)[0]
    assert mem == "peak_rss_above_start_bytes"
    runs = list(df["run"])
    fig = _tradeoff_figure(df, runs, run_palette(runs), plt, sns)
    ax = fig.axes[0]
    xs = sorted(x for c in ax.collections for x, _ in c.get_offsets())
    assert xs == pytest.approx(sorted(df[mem] / 2**30)) and "above the process" in ax.get_xlabel()
    plt.close(fig)


def test_collect_refuses_a_run_whose_per_example_losses_do_not_pair_up(tmp_path):
    """Every run scores the whole eval split before and after training; lists of different lengths would pair
    the wrong examples (zip stopped at the shorter one)."""
    from lorasweep.collect import collect

    run = tmp_path / "results" / "runs" / "full" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"run": "full", "seed": 0, "eval_loss": 1.0}))
    (run / "log_history.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    example = {"loss_sum": 3.0, "tokens": 2}
    (run / "eval_losses.json").write_text(json.dumps({"base": [example] * 3, "final": [example] * 2}))
    out = tmp_path / "out"
    out.mkdir()
    args = ([run / "metrics.json"], [run / "log_history.jsonl"], out / "metrics.csv", out / "history.csv",
            [run / "eval_losses.json"], out / "eval_losses.csv")
    with pytest.raises(ValueError, match="3 untrained and 2 trained"):
        collect(*args)
    (run / "eval_losses.json").write_text(json.dumps({"base": [example] * 2, "final": [example] * 2}))
    collect(*args)
    table = pd.read_csv(out / "eval_losses.csv")
    assert list(table["example"]) == [0, 1] and set(table["run"]) == {"full"}


def test_a_recorded_gpu_sweep_renders_its_cuda_figures(tmp_path):
    """The default five-run sweep as it ran on an H200 (benchmarks/results/h200-2026-11-27b.md: opt-350m's shape,
    CodeAlpaca-20k's size, five jobs sharing the GPU): the report's GPU-only branches (MFU and its bound, CUDA
    peaks, the memory model against them, shared-GPU caveats, the 16-bit frozen base) on real CUDA metrics."""
    from lorasweep import report as R

    rec = REPO / "benchmarks" / "results" / "h200-2026-11-27b-five-run-sweep-x10"
    ctx = R.load(f"{rec}-metrics.csv", f"{rec}-log-history.csv.gz", f"{rec}-data-summary.json",
                 f"{rec}-eval-losses.csv.gz")
    df = ctx["metrics"]
    assert list(df["run"]) == ["full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"]

    table = R.results_table(df)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    header, by = rows[0], {r[0]: r for r in rows[1:]}
    assert by["full"][header.index("MFU")] == "2.2%" and by["full"][header.index("MFU bound")] == "32%"
    assert by["lora-r8"][header.index("peak alloc")] == "4.050 GiB"
    assert "The LoRA runs kept their frozen linear weights in 16 bits" in table and "unlike runs" not in table

    findings = R.findings_section(ctx)
    assert "**Runs that shared their GPU**: every run, each beside up to 4 other training job(s)" in findings
    assert "`full` 10,919 of 158,535 tokens/s (7%; MFU 2.2% of ≤ 32%)" in findings
    assert "Every run stayed under 25% of its bound" in findings
    # timed beside each other on one GPU: no runtime comparison is drawn
    assert "train runtime 57% longer (not comparable" in findings
    # QLoRA's peak above LoRA's although its weights are 40% of theirs: the finding names the activations
    assert ("shrink from 689 MiB to 274 MiB, 40% of `lora-r8`'s, while what autograd keeps for the backward pass "
            "(predicted) grows from 3.3 GiB to 4.04 GiB (bitsandbytes returns each 4-bit layer's output in its input's "
            "dtype") in findings
    same = ctx["metrics_per_seed"].copy()
    same.loc[same["run"] == "qlora-r8", "predicted_activations_bytes"] = same.loc[
        same["run"] == "lora-r8", "predicted_activations_bytes"].iloc[0]
    assert "autograd keeps" not in R.findings_section({**ctx, "metrics_per_seed": same})
    # the explanation is autocast's: not given for runs that trained in fp32
    fp32 = ctx["metrics_per_seed"].assign(precision="fp32")
    assert "autograd keeps" not in R.findings_section({**ctx, "metrics_per_seed": fp32})

    memory = R.memory_model_section(df)
    errors = {r[0]: r[-1] for r in ([c.strip() for c in line.strip("|").split("|")]
                                   for line in memory.splitlines() if line.startswith("| ")) if r[0] in set(df["run"])}
    assert errors == {"full": "−2%", "lora-r8": "−2%", "lora-r128": "−2%", "lora-r256": "−2%",
                      "qlora-r8": "−1%"}

    writeups = R.writeups_section(df, ctx["eval_losses"])
    assert "| lorasweep (NVIDIA H200) | lora-r8" in writeups
    assert re.search(r"peak memory rises with the rank\s*\|\s*agrees", writeups)

    made = plot_all(f"{rec}-metrics.csv", f"{rec}-log-history.csv.gz", tmp_path)
    assert {p.name for p in made if p.suffix == ".png"} == {f"{name}.png" for name in FIGURES}


def test_full_finetunings_runtime_names_the_adapter_runs_faster_beyond_the_tolerance():
    df, ev = _fixture()
    df["train_runtime_s"] = 100.0
    df["other_processes_cpu_share_pct"] = 0.0

    def sentence(frame):
        return next(f for f in F.full_finetuning(F.by_run(frame), F.Losses(ev)) if "train runtime" in f)

    assert sentence(df) == "Full fine-tuning's train runtime is 100.0 s; no adapter run trained faster (by more than 5%)."
    df.loc[df["run"] == "lora-r8", "train_runtime_s"] = 90.0
    df.loc[df["run"] == "lora-r128", "train_runtime_s"] = 97.0  # 3% faster: within the tolerance
    text = sentence(df)
    assert "faster than it (by more than 5%): `lora-r8` (90.0 s)" in text and "lora-r128" not in text


def test_the_writeups_figures_sit_beside_ours_of_the_same_kind_in_the_unit_each_was_given_in():
    """The recorded H200 sweep beside W2 and W3. W2's GPU memory is W&B's share of the L4's 22.5 GiB, a mean of
    NVML's used memory: it sat in one "memory GB" column with W3's max allocated and our peak allocated, as 0.188 x
    22.5 "GB", and ours in 1e9 bytes (lora-r8's 4.05 GiB peak, so in the results table and the claims, read 4.35);
    W3's steps/s and W2's process memory were left out, and nothing said what the sweep trained with beside what
    each write-up did."""
    from lorasweep import report as R

    rec = REPO / "benchmarks" / "results" / "h200-2026-11-27b-five-run-sweep-x10"
    ctx = R.load(f"{rec}-metrics.csv", f"{rec}-log-history.csv.gz", f"{rec}-data-summary.json",
                 f"{rec}-eval-losses.csv.gz")
    text = R.writeups_section(ctx["metrics"], ctx["eval_losses"], ctx["metrics_per_seed"], ctx["data"],
                              ctx["history"])
    rows = {(r["source"].split(" ")[0], r["run"]): r for r in _writeups_rows(text)}
    w2, w3, ours = rows[("W2", "lora-r8")], rows[("W3", "lora-r8")], rows[("lorasweep", "lora-r8")]
    assert w2["mean GPU used"] == "18.8% = 4.23 GiB" and w2["process MiB, mean / max"] == "1898 / 2402"
    assert w2["peak alloc"] == "–" and w3["peak alloc"] == "3.1 GB" and w3["steps/s"] == "2.520"
    m = ctx["metrics"].set_index("run").loc["lora-r8"]
    assert ours["peak alloc"] == f"{m['peak_cuda_allocated_bytes'] / 2**30:.2f} GiB" == "4.05 GiB"
    assert ours["mean GPU used"] == f"{m['mean_cuda_reserved_bytes'] / 2**30:.2f} GiB"
    assert ours["steps/s"] == f"{m['train_steps_per_s']:.3f}"
    assert ours["process MiB, mean / max"] == f"{m['mean_rss_bytes'] / 2**20:.0f} / {m['peak_rss_bytes'] / 2**20:.0f}"
    assert "NVML's used memory" in text and "the CUDA context" in text
    # what each trained with, and the sweep, above the figures
    settings = {r["source"]: r for r in _writeups_rows(text, 0)}
    assert settings["W3"]["epochs"] == "3" and settings["W4"]["learning rate"] == "2e-4"
    mine = settings["lorasweep (this sweep)"]
    assert mine["epochs"] == "1" and mine["examples a step"] == "8" and mine["precision"] == "bf16"
    assert mine["learning rate"] == "full 2e-5; LoRA 2e-4; QLoRA 2e-4"
    assert mine["LoRA"] == "r 8 / 128 / 256, alpha 4r, dropout 0.1, k_proj, q_proj, v_proj"
    assert "one epoch (W3 trained 3, three times as long" in text


def test_w1s_memory_claims_say_which_modules_its_lora_and_ours_adapted():
    """W1's LoRA adapted every linear layer, which its author blames for LoRA's memory above full fine-tuning's:
    the claim was judged on our attention-only LoRA without saying so beside the verdict, and the author's
    explanation, which one sweep cannot test, was not named."""
    df, ev = _fixture()
    claims = F.writeup_claims(df, ev)
    memory = _claim(claims, "W1", "full fine-tuning used the least peak memory")
    assert memory["evidence"].endswith("; W1's LoRA adapted every linear layer, ours `q_proj,k_proj,v_proj`")
    cause = _claim(claims, "W1", "adapting every linear layer (all-linear)")
    assert cause["ours"].startswith("cannot check") and "target_modules: all-linear" in cause["ours"]


def test_a_cpu_sweep_beside_the_writeups_shows_its_resident_memory_as_w2s_process_memory(rendered):
    """The tiny preset's report: no CUDA figure, so the CPU's resident memory sat in the write-ups' GPU memory
    column ("memory GB"); it belongs beside W2's process memory, and the memory claims say what they were judged
    on. The notebook passes the data summary and the training logs, so the settings say 3 epochs."""
    _, text = rendered
    section = text.split("## Beside the published write-ups")[1].split("\n## ")[0]
    rows = {(r["source"].split(" ")[0], r["run"]): r for r in _writeups_rows(section)}
    ours = rows[("lorasweep", "lora-r8")]
    r8 = _fixture()[0].set_index("run").loc["lora-r8"]
    assert ours["peak alloc"] == "–" and ours["mean GPU used"] == "–"
    assert ours["process MiB, mean / max"] == f"{r8['mean_rss_bytes'] / 2**20:.0f} / {r8['peak_rss_bytes'] / 2**20:.0f}"
    assert "This sweep ran on the CPU: it has no CUDA figures" in section
    assert "a claim about memory on the CPU's peak resident memory" in section
    mine = {r["source"]: r for r in _writeups_rows(section, 0)}["lorasweep (this sweep)"]
    assert mine["epochs"] == "3" and "100% of train" in mine["model, data"]


def test_a_memory_or_runtime_not_measured_is_compared_with_nothing():
    """A missing figure (NaN) is neither "about the same" nor a verdict on a published claim: it is named as
    not measured, and the runs that were measured are compared as before."""
    df, ev = _fixture()
    mem, _ = F.memory_measure(df)
    df[mem] = df[mem].astype(float)
    full = df.loc[df["run"] == "full", mem].iloc[0]
    df.loc[df["run"] != "full", mem] = full * 1.5
    df.loc[df["run"] == "lora-r128", mem] = float("nan")

    def sentences(frame):
        return F.full_finetuning(F.by_run(frame), F.Losses(ev))

    text = next(f for f in sentences(df) if f.startswith("Its "))
    assert "about the same" not in text and "lowest" not in text
    assert "lower than `lora-r8`" in text and text.endswith("; not measured for `lora-r128`.")
    nofull = df.copy()
    nofull.loc[nofull["run"] == "full", mem] = float("nan")
    assert next(f for f in sentences(nofull) if f.startswith("Its ")).endswith("was not measured.")
    claims = {c["claim"]: c["ours"] for c in F.writeup_claims(df, ev)}
    assert claims["full fine-tuning used the least peak memory"] == "cannot check (not measured: `lora-r128`)"
    assert claims["peak memory rises with the rank"] == "cannot check (not measured for every run)"
    slow = df.copy()
    slow.loc[slow["run"] == "lora-r8", "train_runtime_s"] = float("nan")
    runtime = next(f for f in sentences(slow) if "train runtime" in f)
    assert runtime.endswith("; not measured for `lora-r8`.")
    assert F.mib(float("nan")) == "not measured"


def test_a_rank_step_without_a_significance_is_not_called_noise():
    verdict = F.returns_verdict([(8, 128, -0.05, True, 0.01), (128, 256, +0.04, None, None)])
    assert "r=128 → 256: +0.0400 (significance unknown)" in verdict and "within noise" not in verdict
    assert "r=8 → 128: +0.0010 (within noise)" in F.returns_verdict([(8, 128, +0.001, False, 0.01),
                                                                    (128, 256, -0.05, True, 0.01)])


def test_parameter_ratios_keep_their_fraction_and_intervals_use_students_t():
    assert [F.times(x) for x in (16.0, 2.0, 1.5, 1.98)] == ["16", "2", "1.5", "2"]
    # the per-example interval over n examples takes t with n - 1 degrees of freedom: 2.023 at 40, not 1.96
    assert F.t975(39) == pytest.approx(2.0227, abs=1e-4) and F.t975(999) == pytest.approx(1.9623, abs=1e-4)
    assert F.t975(31) == pytest.approx(2.0395, abs=1e-4) and F.t975(30) == 2.042
    _, ev = _fixture()
    four = ev[ev["example"].isin(sorted(ev["example"].unique())[:4])]
    d = F.Losses(four).diff("lora-r8", "qlora-r8")
    a, b = (four[four["run"] == r].set_index("example") for r in ("lora-r8", "qlora-r8"))
    diff, tokens = a["final_loss_sum"] - b["final_loss_sum"], a["tokens"]
    mean = diff.sum() / tokens.sum()
    se = ((4 / 3 * ((diff - mean * tokens) ** 2).sum()) ** 0.5) / tokens.sum()
    assert d["n"] == 4 and d["half"] == pytest.approx(3.182 * se)


def test_the_setup_table_shows_each_runs_settings_as_trained_not_their_mean_over_seeds():
    from lorasweep import report

    m2, _ = _two_seeds()
    m3 = pd.concat([m2, m2[m2["seed"] == 1].assign(seed=2)], ignore_index=True).assign(lora_dropout=0.1)
    m3.loc[(m3["run"] == "lora-r8") & (m3["seed"] == 1), "batch_size"] = 4  # one seed's out-of-memory retry
    agg = F.by_run(m3)
    assert str(agg.set_index("run").loc["lora-r128", "lora_dropout"]) == "0.10000000000000002"  # the mean of three
    hp = report.hyperparameters(agg, m3, ["run", "lora_dropout", "batch_size", "seeds"]).set_index("run")
    assert str(hp.loc["lora-r128", "lora_dropout"]) == "0.1"
    assert hp.loc["lora-r8", "batch_size"] == f"{m3['batch_size'].iloc[0]}, 4"
    assert hp.loc["lora-r8", "seeds"] == "0,1,2"


def test_the_setup_table_writes_learning_rates_as_the_config_does():
    """The default sweep's learning rates (2e-5 full, 2e-4 adapters, as H200 recorded them) went through tabulate's
    number parsing into one column as "2e-05" beside "0.0002", the same quantity in two notations and neither the
    config's nor the write-ups' table's ("full 2e-5; LoRA 2e-4")."""
    from lorasweep import report as R

    rec = REPO / "benchmarks" / "results" / "h200-2026-11-27b-five-run-sweep-x10"
    ctx = R.load(f"{rec}-metrics.csv", f"{rec}-log-history.csv.gz", f"{rec}-data-summary.json")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in R.setup_section(ctx).splitlines()
            if line.startswith("| ")]
    lr = {r[0]: r[rows[0].index("learning_rate")] for r in rows[1:]}
    assert lr == {"full": "2e-5", "lora-r8": "2e-4", "lora-r128": "2e-4", "lora-r256": "2e-4", "qlora-r8": "2e-4"}
    assert {len(r) for r in rows} == {len(rows[0])}


def test_the_setup_says_what_max_length_did_to_the_examples():
    from lorasweep import report

    df, _ = _fixture()
    assert report.length_text(df) == ""  # metrics from before the counts: nothing claimed
    counts = {"max_length": 256, "train_examples_cut_at_max_length": 12, "eval_examples_cut_at_max_length": 1,
              "train_examples_dropped_too_long": 0, "eval_examples_dropped_too_long": 0}
    text = report.length_text(df.assign(**counts))
    assert text == (" Sequences are cut at `training.max_length` = 256 tokens: 12 training and 1 eval examples are "
                    "longer, trained and scored on their response's start only.")
    none = report.length_text(df.assign(**{**counts, "train_examples_cut_at_max_length": 0,
                                           "eval_examples_cut_at_max_length": 0, "eval_examples_dropped_too_long": 2}))
    assert "no response is cut; 0 training and 2 eval examples are left out" in none
    mixed = df.assign(**counts)  # a sweep where only some runs were trained since the counts exist
    mixed.loc[mixed.index[0], list(counts)] = float("nan")
    assert report.length_text(mixed) == text


def test_the_setup_says_how_many_examples_hold_a_special_tokens_text():
    from lorasweep import report

    df, _ = _fixture()
    assert report.special_text(df) == ""  # metrics from before the count: nothing claimed
    none = {"train_examples_with_special_token_text": 0, "eval_examples_with_special_token_text": 0}
    assert report.special_text(df.assign(**none)) == ""
    some = df.assign(train_examples_with_special_token_text=3, eval_examples_with_special_token_text=1)
    some.loc[some.index[0], ["train_examples_with_special_token_text"]] = float("nan")  # trained before the count
    text = report.special_text(some)
    assert text.startswith(" 3 training and 1 eval examples hold the text of one of the tokenizer's special tokens")
    assert "`</s>`" in text


def test_with_replicate_seeds_a_timing_or_memory_difference_inside_their_spread_is_about_the_same():
    """Timings and memory are compared at fixed tolerances with one seed; with replicates the interval of the
    difference of the seed means (Student's t) widens it: a gap the seeds' own spread covers is no finding."""
    df, ev = _fixture()
    df = df.assign(train_runtime_s=100.0, other_processes_cpu_share_pct=0.0)
    df.loc[df["run"] == "lora-r8", "train_runtime_s"] = 110.0  # 10% longer than full, beyond the 5% tolerance

    def seeds(jitter):  # three seeds, each run's runtime x (1 - j), x 1, x (1 + j)
        return pd.concat([df.assign(seed=k, train_runtime_s=df["train_runtime_s"] * f)
                          for k, f in enumerate((1 - jitter, 1.0, 1 + jitter))], ignore_index=True)

    def r8_line(frame):
        return next(t for t in F.tradeoffs(frame) if t.startswith("`lora-r8`"))

    assert "train runtime 10% longer" in r8_line(df)  # one seed: the fixed tolerance
    assert "train runtime 10% longer" in r8_line(seeds(0.005))  # seeds that agree closely: still a finding
    wide = r8_line(seeds(0.08))  # t(2) = 4.3 x the spread of 8% runs covers the 10% gap
    assert "train runtime not distinguishable from the seeds' spread (+10.0%)" in wide
    runtime = next(f for f in F.full_finetuning(F.by_run(seeds(0.08)), F.Losses(ev)) if "train runtime" in f)
    assert runtime.endswith("no adapter run trained faster (by more than 5% and the seeds' spread).")
    claims = {c["claim"]: c for c in F.writeup_claims(seeds(0.08), ev)}
    assert "5% or the seeds' spread" in claims["training gets slower as the rank grows"]["evidence"]


def test_memory_and_timing_tolerances_apply_to_each_comparison_from_its_own_base():
    """The CPU floor is a number of bytes whichever run is larger, and each step of a claim over several runs is
    judged with its own tolerance (its own base value, its own pair's seed spread)."""
    mem = "peak_rss_above_start_bytes"
    m = pd.DataFrame({"run": ["a", "b"], mem: [60 * 2**20, 30 * 2**20]}).set_index("run")
    assert F.mem_text(m, mem, "b", "a") == "50% lower" and F.mem_text(m, mem, "a", "b") == "2.0× higher"
    assert F._rises([30 * 2**20, 200 * 2**20, 300 * 2**20],
                    [F.mem_tol(mem, v) for v in (30 * 2**20, 200 * 2**20)]) == "agrees"
    df, ev = _fixture()
    df = df.assign(other_processes_cpu_share_pct=0.0)
    seeds = []
    for seed, times_ in enumerate(((10.0, 10.7, 11.0), (10.0, 10.7, 13.0))):  # r=256 alone varies between seeds
        t = dict(zip(["lora-r8", "lora-r128", "lora-r256"], times_))
        seeds.append(df.assign(seed=seed, train_runtime_s=[t.get(r, 10.0) for r in df["run"]]))
    claims = {c["claim"]: c["ours"] for c in F.writeup_claims(pd.concat(seeds, ignore_index=True), ev)}
    # r=8 -> 128: 7% longer with no spread at all; r=128 -> 256 inside its own seeds' spread
    assert claims["training gets slower as the rank grows"] == "partly: some steps within 5% or the seeds' spread"


def test_collect_keeps_each_examples_untrained_and_trained_losses_apart(tmp_path):  # K01
    from lorasweep.collect import collect

    run = tmp_path / "results" / "runs" / "lora-r8" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"run": "lora-r8", "seed": 0, "eval_loss": 1.0}))
    (run / "log_history.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (run / "eval_losses.json").write_text(json.dumps({
        "base": [{"loss_sum": 9.0, "tokens": 3}, {"loss_sum": 8.0, "tokens": 2}],
        "final": [{"loss_sum": 3.0, "tokens": 3}, {"loss_sum": 1.0, "tokens": 2}]}))
    out = tmp_path / "out"
    out.mkdir()
    collect([run / "metrics.json"], [run / "log_history.jsonl"], out / "m.csv", out / "h.csv",
            [run / "eval_losses.json"], out / "e.csv")
    t = pd.read_csv(out / "e.csv")
    assert t["base_loss_sum"].tolist() == [9.0, 8.0] and t["final_loss_sum"].tolist() == [3.0, 1.0]
    assert t["tokens"].tolist() == [3, 2] and t["seed"].tolist() == [0, 0]


def test_lowest_takes_each_memory_floor_from_the_larger_run():  # F07
    mem = "peak_rss_above_start_bytes"
    values = pd.Series({"a": 100 * 2**20, "b": 130 * 2**20})  # 30 MiB apart: beyond the 24 MiB noise
    assert F._lowest(values, "a", ["b"], lambda base, other: F.mem_tol(mem, values[base])) == "agrees"


def test_an_infinite_eval_loss_is_left_out_like_nan():  # F16
    df = pd.DataFrame({"run": ["full", "lora-r8"], "eval_loss": [1.0, float("inf")]})
    assert F.diverged(df)[1] == ["lora-r8"]


def test_a_run_beside_one_other_job_on_its_gpu_is_timing_suspect():  # F18
    df = pd.DataFrame({"run": ["full", "lora-r8"], "gpu_jobs_beside_max": [0, 1]})
    assert set(F.timing_causes(df)) == {"lora-r8"}


def test_the_cpu_memory_floor_never_narrows_the_relative_tolerance():  # F01
    big = 4 * 2**30
    assert F.mem_tol("peak_rss_above_start_bytes", big) == F.MEM_TOL
    m = pd.DataFrame({"run": ["a", "b"], "peak_rss_above_start_bytes": [big, big * 1.015]}).set_index("run")
    assert F.mem_text(m, "peak_rss_above_start_bytes", "b", "a").startswith("about the same")


def _two(col, va, vb):
    # two runs with per-run mean, sd and n_seeds, as by_run gives them
    return pd.DataFrame({"run": ["a", "b"], col: va[0:1] + vb[0:1], f"{col}_sd": [va[1], vb[1]],
                         "n_seeds": [va[2], vb[2]]}).set_index("run")


def _seeded(vals_a, vals_b, tokens=(2, 4, 4, 3)):
    rows = []
    for run, per_seed in (("a", vals_a), ("b", vals_b)):
        for seed, shift in enumerate(per_seed):
            for i, n in enumerate(tokens):
                rows.append({"run": run, "seed": seed, "example": i, "tokens": n,
                             "base_loss_sum": 2.0 * n, "final_loss_sum": (1.0 + 0.1 * i + shift) * n})
    return pd.DataFrame(rows)


def test_seed_tolerance_uses_t_with_n_minus_1_dof_and_never_narrows_the_base():  # F02, F03
    m = _two("t", (100.0, 2.0, 2), (110.0, 3.0, 3))
    tol, widened = F.seed_tol(m, "t", "a", "b", 0.05)
    assert tol == pytest.approx(12.706 * math.sqrt(4 / 2 + 9 / 3) / 100) and widened
    close = _two("t", (100.0, 0.01, 3), (103.0, 0.01, 3))  # seeds that agree closely: still the base tolerance
    assert F.seed_tol(close, "t", "a", "b", 0.05) == (0.05, False)
    assert F.time_text(close.assign(n_seeds=3), "t", "b", "a", "longer", "shorter").startswith("about the same")


def test_the_seed_part_of_a_paired_interval_matches_a_hand_computation():  # F04
    t = _seeded([0.0, 0.2], [0.1, 0.1])
    d = F.Losses(t).diff("a", "b")
    ta = t[t.run == "a"].groupby("example")[["tokens", "final_loss_sum"]].mean()
    tb = t[t.run == "b"].groupby("example")[["tokens", "final_loss_sum"]].mean()
    diff, n = ta["final_loss_sum"] - tb["final_loss_sum"], ta["tokens"]
    mean = diff.sum() / n.sum()
    se = math.sqrt(4 / 3 * ((diff - mean * n) ** 2).sum()) / n.sum()
    per_seed_a = t[t.run == "a"].groupby("seed").apply(lambda g: g.final_loss_sum.sum() / g.tokens.sum())
    var = per_seed_a.var(ddof=1) / 2  # b's seeds agree exactly: no variance
    assert d["half"] == pytest.approx(math.sqrt((3.182 * se) ** 2 + 12.706 ** 2 * var))


def test_a_run_against_its_own_start_carries_its_seeds_spread():  # F06
    t = _seeded([0.0, 0.3], [0.0, 0.0])
    d = F.Losses(t).diff("a", "a", "final", "base")
    per_seed = t[t.run == "a"].groupby("seed").apply(
        lambda g: (g.final_loss_sum.sum() - g.base_loss_sum.sum()) / g.tokens.sum())
    seed_half = 12.706 * per_seed.std(ddof=1) / math.sqrt(2)
    assert d["half"] > seed_half  # the seeds' disagreement is in the interval


def test_memory_measure_falls_back_to_total_rss_when_a_run_lacks_its_start():  # F10
    df = pd.DataFrame({"run": ["full", "lora-r8"], "peak_rss_bytes": [3e9, 2e9],
                       "rss_before_load_bytes": [1e9, float("nan")], "eval_loss": [1.0, 1.1]})
    assert F.memory_measure(F.by_run(df))[0] == "peak_rss_bytes"


def test_a_resumed_run_is_named_in_the_findings():
    """A run resumed after a crash has a runtime of several segments (each one's start-up counted) and peaks of
    several processes: the report says which runs, from which step (a review found it said nothing)."""
    df = pd.DataFrame({"run": ["full", "qlora-r8"], "seed": [0, 0], "train_segments": [1, 2],
                       "resumed_from_step": [None, 50]})
    note = F.resumed(df)
    assert note.startswith("**Runs resumed after a crash or a kill**: `qlora-r8`: 2 segments, the last from step 50.")
    assert F.resumed(df.assign(train_segments=[1, 1])) is None
    assert F.resumed(df.drop(columns=["train_segments"])) is None  # runs from before it was recorded


def test_the_setup_names_the_model_files_and_says_outright_when_runs_loaded_different_ones():
    """An upstream update (or new files under a local path) between two runs' training: the runs did not fine-tune
    the same model, and the report's setup says so, naming which run loaded what."""
    import pandas as pd

    from lorasweep.report import model_text

    same = pd.DataFrame({"run": ["full", "lora-r8"], "model": "facebook/opt-350m", "model_revision": None,
                         "model_commit": "c0ffee" * 6 + "ab", "model_files_sha256": "f" * 64})
    assert model_text(same) == "`facebook/opt-350m` (commit `c0ffeec0ff`, files `ffffffffffff`)"
    mixed = same.assign(model_commit=["c0ffee" * 6 + "ab", "beef" * 10], model_files_sha256=["f" * 64, "e" * 64])
    text = model_text(mixed)
    assert "**The runs loaded different model files**" in text
    assert "commit `c0ffeec0ff`, files `ffffffffffff`: `full`" in text
    assert "commit `beefbeefbe`, files `eeeeeeeeeeee`: `lora-r8`" in text
    assert "pin `model.revision`" in text
    pinned = same.assign(model_revision="c0ffee" * 6 + "ab")
    assert model_text(pinned).startswith(f"`facebook/opt-350m` at revision `{'c0ffee' * 6}ab` (commit `c0ffeec0ff`")
    old = same.drop(columns=["model_commit", "model_files_sha256"])  # runs trained before lorasweep recorded them
    assert model_text(old) == "`facebook/opt-350m`"
    # one run trained before the fingerprint was recorded, beside one after: no alarm, the gap said
    both = same.assign(model_files_sha256=[None, "f" * 64], model_commit=[None, "c0ffee" * 6 + "ab"])
    assert model_text(both) == ("`facebook/opt-350m` (commit `c0ffeec0ff`, files `ffffffffffff`; not recorded by "
                                "`full` (trained before lorasweep recorded it))")

# ---------------------------------------------------------------- a review of a two-seed report (tiny preset)


def _timed(runtimes: dict) -> pd.DataFrame:
    """The fixture trained with seeds 0 and 1, each run's seeds taking the given runtimes (default: the fixture's),
    with the rates train.py computes from them (same counts every seed)."""
    m, _ = _fixture()
    rows = []
    for seed in (0, 1):
        t = m.assign(seed=seed, train_runtime_s=[runtimes.get(r, (rt, rt))[seed]
                                                 for r, rt in zip(m["run"], m["train_runtime_s"])])
        rows.append(t.assign(train_samples_per_s=t["train_samples"] / t["train_runtime_s"],
                             train_steps_per_s=t["train_steps"] / t["train_runtime_s"],
                             train_tokens_nonpad_per_s=t["train_tokens_nonpad"] / t["train_runtime_s"]))
    return pd.concat(rows, ignore_index=True)


REVIEWED = {"full": (2.402, 38.258), "lora-r128": (56.477, 88.661), "lora-r256": (13.357, 4.394)}


def test_a_runs_rates_over_seeds_are_pooled_so_that_they_agree_with_its_mean_runtime():
    """Seeds of 2.4 s and 38.3 s: the mean of their steps/s (29.9) implied a runtime of 4.5 s beside the mean
    runtime of 20.3 s, and a findings sentence said runtime -87.8% but tokens/s +943.5%. The rate of a run is its
    seeds' counts over their summed runtime, the rate of the mean runtime; its ± stays the seeds' own spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorasweep.plots import _bar, run_palette
    from lorasweep.report import results_table

    per_seed = _timed(REVIEWED)
    agg = F.by_run(per_seed).set_index("run")
    full = agg.loc["full"]
    assert full["train_runtime_s"] == pytest.approx(20.33)
    for rate, count in (("train_steps_per_s", 135), ("train_samples_per_s", 1074),
                        ("train_tokens_nonpad_per_s", 73992)):
        assert full[rate] == pytest.approx(count / full["train_runtime_s"])  # not the mean of the seeds' rates
        assert full[f"{rate}_sd"] == pytest.approx(pd.Series([count / 2.402, count / 38.258]).std())
    row = next(line for line in results_table(agg.reset_index()).splitlines() if line.startswith("| full "))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4].startswith("20.3 ±") and cells[6].startswith(f"{135 / full['train_runtime_s']:.3f} ±")
    # the findings: a runtime change and the tokens/s change beside it describe the same runs
    step = next(s for s in F.rank_steps(agg.reset_index(), F.Losses(_fixture()[1])) if s.startswith("**r=128"))
    runtime = float(re.search(r"train runtime [^,]*?\(([+−][\d.]+)%\)", step).group(1).replace("−", "-"))
    tokens = float(re.search(r"tokens/s [^,]*?\(([+−][\d.]+)%\)", step).group(1).replace("−", "-"))
    assert (1 + runtime / 100) * (1 + tokens / 100) == pytest.approx(1, abs=0.01)  # -87.8% and +717.6%
    assert "tokens/s not distinguishable from the seeds' spread (+717.6%)" in step  # not "about the same"
    # the throughput figure draws the same rate as the table
    runs = list(agg.index)
    fig, ax = plt.subplots()
    _bar(ax, per_seed, "train_tokens_nonpad_per_s", run_palette(runs), "tokens/s", runs)
    widths = {run: p.get_width() for run, p in zip(runs, ax.patches)}
    assert "pooled" in ax.get_xlabel() and ax.get_xlim()[0] == 0  # a wide sd draws no negative rate
    plt.close(fig)
    assert widths["full"] == pytest.approx(full["train_tokens_nonpad_per_s"])


def test_a_rise_inside_its_tolerance_is_too_close_to_call_and_only_the_opposite_disagrees():
    """84.8 -> 89.6 -> 98.5 MiB, each step inside 24 MiB: the claim "memory rises with the rank" is not refuted."""
    mem = "peak_rss_above_start_bytes"
    values = [84.8 * 2**20, 89.6 * 2**20, 98.5 * 2**20]
    tols = [F.mem_tol(mem, v) for v in values[:2]]
    assert F._rises(values, tols, "24 MiB") == "too close to call (every step within 24 MiB)"
    assert F._rises(values[::-1], tols, "24 MiB") == "too close to call (every step within 24 MiB)"
    assert F._rises([300 * 2**20, 200 * 2**20], 0.02) == "disagrees"  # falls beyond the tolerance
    assert F._rises([3.0, 2.0, 1.0], 0.02, falls=True) == "agrees"
    assert F._rises([1.0, 2.0], 0.02, falls=True) == "disagrees"
    # no tolerance (one seed's train loss): equal values are no change, not "within 0%"
    assert F._rises([2.0, 2.0], [0.0], falls=True) == "disagrees: no step changes it"
    assert F._rises([3.0, 2.0, 2.0], [0.0, 0.0], falls=True) == "partly: some steps change nothing"
    df, ev = _fixture()
    claims = F.writeup_claims(df.assign(peak_rss_bytes=[1.0e9, 1.0e9, 1.001e9, 1.002e9, 1.0e9]), ev)  # a MiB apart
    assert next(c for c in claims if c["claim"] == "peak memory rises with the rank")["ours"].startswith(
        "too close to call")


def test_w1s_best_lora_is_the_best_of_its_plain_ranks_and_the_evidence_says_variants_are_left_out():
    df, ev = _fixture()
    r8 = df[df["run"] == "lora-r8"]
    variant = r8.assign(run="lora-r32-olora", rank=32, eval_loss=r8["eval_loss"] - 0.05)  # better than every rank
    df = pd.concat([df, variant], ignore_index=True)
    ev = pd.concat([ev, ev[ev["run"] == "lora-r8"].assign(run="lora-r32-olora")], ignore_index=True)
    claim = next(c for c in F.writeup_claims(df, ev) if c["claim"] == "full fine-tuning reached the lowest eval loss")
    assert "`lora-r8`" in claim["evidence"] and "best LoRA" not in claim["evidence"]
    assert "the best of W1's LoRA ranks (variants excluded: `lora-r32-olora`)" in claim["evidence"]


def test_the_writeups_train_loss_claims_are_checked_on_our_train_loss_of_the_same_kind():
    """W3 reported train_loss (the mean over the run), W2 the last logged train loss: a claim of theirs is checked
    on that figure of ours, not on our eval loss; W2's "lower loss at higher rank" is cited."""
    df, ev = _fixture()  # eval losses: r=8 < r=128 < r=256, every step not distinguishable
    falls = df.assign(train_loss=[4.0, 3.0, 2.0, 1.0, 3.0], train_loss_last=[4.0, 1.7, 1.4, 1.3, 1.7])
    claims = F.writeup_claims(falls, ev)
    w3 = _claim(claims, "W3", "a higher LoRA rank gives a lower train loss")
    w2 = _claim(claims, "W2", "a higher LoRA rank gives a lower last logged train loss")
    assert w3["ours"] == "agrees" and w2["ours"] == "agrees"
    assert "r=8 3.0000, r=128 2.0000, r=256 1.0000" in w3["evidence"] and "one seed" in w3["evidence"]
    rises = falls.assign(train_loss=[4.0, 1.0, 2.0, 3.0, 1.0])
    assert _claim(F.writeup_claims(rises, ev), "W3", "a higher LoRA rank gives a lower train loss")["ours"] == \
        "disagrees"
    for c in claims:  # no claim of W2's or W3's about a loss rests on our eval loss
        if ("W2" in c["source"] or "W3" in c["source"]) and "loss" in c["claim"]:
            assert "train loss" in c["claim"] and "eval loss" not in c["evidence"], c
    # with replicate seeds a step inside their spread is too close to call
    seeds = pd.concat([falls.assign(seed=0),
                       falls.assign(seed=1, train_loss=falls["train_loss"] * [1, 1.5, 0.5, 1.5, 1])])
    assert _claim(F.writeup_claims(seeds, ev), "W3", "a higher LoRA rank gives a lower train loss")["ours"].startswith(
        "too close to call")


def _writeups_rows(text: str, table: int = 1) -> list[dict]:
    """The rows of the write-ups section's figures table (``table`` 0: its settings table)."""
    tables = [block for block in text.split("\n\n") if block.startswith("| ")]
    lines = [line for line in tables[table].splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    return [dict(zip(header, (c.strip() for c in line.split("|")[1:-1]))) for line in lines[1:]]


def test_the_writeups_figures_keep_their_decimals_and_ours_show_theirs_and_their_spread():
    from lorasweep.report import writeups_section

    m2, ev2 = _two_seeds()
    rows = _writeups_rows(writeups_section(F.by_run(m2), ev2, m2))
    w3 = {r["run"]: r for r in rows if r["source"].startswith("W3")}
    assert [w3[r]["train loss"] for r in ("lora-r8", "lora-r128", "lora-r256")] == ["1.7972", "1.7856", "1.7853"]
    assert w3["lora-r8"]["samples/s"] == "20.158" and w3["lora-r8"]["peak alloc"] == "3.1 GB"
    w2 = {r["run"]: r for r in rows if r["source"].startswith("W2")}
    assert w2["lora-r256"]["runtime s"] == "907.40" and w2["lora-r256"]["last train loss"] == "1.33"
    ours = next(r for r in rows if r["source"].startswith("lorasweep") and r["run"] == "lora-r8")
    assert "mean ± sd over seeds" in ours["source"]
    r8 = F.by_run(m2).set_index("run").loc["lora-r8"]
    assert ours["runtime s"] == f"{r8['train_runtime_s']:.1f} ± {r8['train_runtime_s_sd']:.1f}"
    assert ours["train loss"].startswith(f"{r8['train_loss']:.4f}")


def test_a_two_seed_report_says_what_its_figures_and_their_spread_are():
    from lorasweep import report

    m2, ev2 = _two_seeds()
    ctx = {"metrics": F.by_run(m2), "metrics_per_seed": m2, "eval_losses": ev2,
           "data": json.loads((FIXTURE / "summary.json").read_text())}
    title, findings = report.title_section(ctx, "x"), report.findings_section(ctx)
    results, memory = report.results_table(ctx["metrics"]), report.memory_model_section(ctx["metrics"])
    assert "the sample sd with n − 1" in title and "the sample sd (n − 1)" in results
    assert "every figure is the mean over seeds" not in results and "exp of the mean eval loss" in results
    assert "pooled" in results
    lowest = next(line for line in findings.splitlines() if "**Lowest eval loss" in line)
    assert re.search(r"\(\d\.\d{4} ± \d\.\d{4}, mean ± sd over seeds", lowest)
    runtime = next(line for line in findings.splitlines() if "Full fine-tuning's train runtime is" in line)
    assert re.search(r"runtime is [\d.]+ ± [\d.]+ s \(mean ± sd over seeds\)", runtime)
    assert "every figure here is the mean over the seeds" in memory
    assert "every figure here" not in report.memory_model_section(F.by_run(_fixture()[0]))  # one seed: no note


def test_adapter_stages_name_their_seed_and_the_figures_colour_and_label_what_they_show(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from lorasweep import report
    from lorasweep.plots import _memory_figure, run_palette

    verify = tmp_path / "results" / "runs" / "lora-r8" / "seed3" / "verify.json"
    verify.parent.mkdir(parents=True)
    verify.write_text(json.dumps({"run": "lora-r8", "merged_onto": "base weights", "max_abs_logit_diff": 1e-7,
                                  "tolerance": 1e-3, "within_tolerance": True, "greedy_identical_count": 8,
                                  "prompts": 8, "eval_loss_adapter": 1.0, "eval_loss_merged": 1.0}))
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([{"instruction": "Say hi", "input": "", "reference": "hi",
                                    "completions": {"lora-r8": "hi"}}]))
    text = report.adapters_section([verify], None, samples)
    merge, greedy = (next(line for line in text.splitlines() if line.startswith(s))
                     for s in ("Each adapter", "Greedy completions"))
    assert "seed 3, the first of the sweep's seeds" in merge and "seed 3" in greedy
    assert "seed 5" in report.adapters_section([], None, samples, first_seed=5)
    # darker for a higher rank whatever the runs' order; a variant of rank 8 beside lora-r8
    runs = ["full", "lora-r256", "lora-r8-rslora-dora", "lora-r32-olora", "lora-r8"]
    pal = run_palette(runs)
    light = [sum(to_rgb(pal[r])) for r in ("lora-r8", "lora-r8-rslora-dora", "lora-r32-olora", "lora-r256")]
    assert light == sorted(light, reverse=True)
    assert "darker for a higher rank" in report.figures_section("figures")
    # the memory figure says its bars are means over seeds and draws their spread
    m2, _ = _two_seeds()
    m2["peak_rss_bytes"] = m2["peak_rss_bytes"].astype(float) * (1 + 0.01 * m2["seed"])
    df = F.by_run(m2)
    fig = _memory_figure(df, list(df["run"]), run_palette(list(df["run"])), plt, 3, m2)
    left, right = fig.axes[:2]
    assert "mean of 2 seeds ± sd" in left.get_title() and "mean of 2 seeds ± sd" in right.get_xlabel()
    assert left.containers and any(type(c).__name__ == "ErrorbarContainer" for c in right.containers)
    plt.close(fig)


def test_timing_caveats_name_each_runs_own_cause():
    """A CPU sweep on a busy machine never says "shared GPU"; a run beside other jobs on its GPU says so."""
    df, ev = _fixture()
    busy = df.assign(other_processes_cpu_share_pct=[66.0, 72.0, 1.0, 1.0, 1.0], gpu_jobs_beside_max=float("nan"))
    texts = F.findings(busy, ev) + F.tradeoffs(busy) + [c["ours"] for c in F.writeup_claims(busy, ev)]
    caveats = [t for t in texts if "not comparable" in t or t.startswith("cannot check (")]
    assert caveats and not any("GPU" in t.split("not comparable")[-1] for t in caveats)
    assert any("(not comparable: `full` and `lora-r8` timed on a busy machine, other processes taking up to 66% "
               "and 72% of the CPU respectively)" in t for t in texts)
    shared = df.assign(other_processes_cpu_share_pct=1.0, gpu_jobs_beside_max=[0, 0, 3, 0, 0])
    step = next(s for s in F.rank_steps(F.by_run(shared), F.Losses(ev), suspect=F.timing_causes(shared))
                if s.startswith("**r=8"))
    assert "(not comparable: `lora-r128` timed beside up to 3 other training job(s) on its GPU)" in step
    assert "busy machine" not in step


def test_control_characters_of_a_sample_are_escaped_in_the_report(tmp_path):
    """A greedy sample with NUL or ESC went into summary.md raw (grep called the file binary)."""
    from lorasweep.report import _cell, adapters_section

    assert _cell("ok\x1b[31m\x00 x\x0e\x7f\x85") == "`ok\\x1b[31m\\x00 x\\x0e\\x7f\\x85`"
    assert _cell("a \t\n\r b") == "`a b`" and _cell("\x00") == "`\\x00`"
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([{"instruction": "Echo\x1b", "input": "in\x00", "reference": "r",
                                    "completions": {"base (untrained)": "::\x0e\x0e134", "lora-r8": "fine"}}]))
    text = adapters_section([], None, samples)
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text)
    assert "::\\x0e\\x0e134" in text and "Echo\\x1b" in text and "control characters are shown as escapes" in text


def test_markup_in_a_sample_instruction_or_input_is_shown_as_text_in_the_report(tmp_path):
    """The samples' instruction went into summary.md as Markdown and their input into one code span: CodeAlpaca's
    "select all <p> tags" became HTML, a link a link, an input with a blank line and a `# comment` line a heading,
    an input holding a table's delimiter row a table, an input with a backtick ended its code span early."""
    markdown_it = pytest.importorskip("markdown_it")
    from lorasweep.report import adapters_section

    md = markdown_it.MarkdownIt("commonmark").enable("table")  # GitHub's: CommonMark + tables
    samples = [
        {"instruction": "Create a CSS selector to select all <p> tags and <h1> elements",
         "input": "x = 1\n\n# comment line\ny = `two`", "reference": "r", "completions": {"full": "a"}},
        {"instruction": "Find the sum:\n# not a heading\nUse `code`, *stars*, _x_, [a link](http://e.com), &amp; \\",
         "input": "a | b\n---|---\n1 | 2", "reference": "r", "completions": {"full": "b"}},
        {"instruction": "Say hi", "input": "`<b>` and ``two``", "reference": "r", "completions": {"full": "c"}},
    ]
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(samples))
    html = md.render(adapters_section([], None, path))
    assert "<p> tags" not in html and "<h1>" not in html and "<b>" not in html  # no HTML from the data
    assert "<a " not in html and "<em>" not in html and "<h" not in html.replace("<h2>Samples", "")  # nor Markdown
    assert html.count("<table>") == len(samples)  # the samples' own tables, no other
    text = re.sub(r"<[^>]+>", "", html).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
    text = text.replace("&amp;", "&")
    assert "select all <p> tags and <h1> elements" in text
    assert "Find the sum: # not a heading Use `code`, *stars*, _x_, [a link](http://e.com), &amp; \\" in text
    for s in samples:  # every input shown as written, line by line
        assert s["input"] in text


def test_a_url_in_a_sample_instruction_is_shown_as_written_not_as_a_broken_link():
    """GitHub links a bare ``http://...`` or ``www....`` from its raw text, the backslash escapes in it kept: an
    instruction's ``https://en.wikipedia.org/wiki/Machine_learning`` showed as ``.../Machine\\_learning`` and linked
    there. A URL is now shown as text: nothing in it starts a link, and CommonMark's reading of its escapes gives it
    back as written."""
    from lorasweep.report import _text

    for url in ("https://en.wikipedia.org/wiki/Machine_learning", "www.example.com/a_b*c*", "_www.x.org/a_b",
                "FTP://X.ORG/~x&y"):
        text = _text(f"Summarise ({url}) in 3 lines")
        assert not re.search(r"(?i)(?:^|[\s*_~(])www\.|(?<!\\)://", text), text  # GFM's autolink triggers
        assert re.sub(r"\\([!-/:-@[-`{-~])", r"\1", text) == f"Summarise ({url}) in 3 lines"


def test_a_sample_input_of_several_lines_keeps_its_first_lines_indentation_in_the_report(tmp_path):
    """An input of several lines is a code block shown as written: the input was stripped as a whole, which took its
    first line's indentation (a snippet from inside a function showed its first line flush left, the rest indented);
    only the blank lines around it are left out."""
    markdown_it = pytest.importorskip("markdown_it")
    import html

    from lorasweep.report import adapters_section

    code = "    if x:\n        return 1\n    return 2"
    samples = [{"instruction": "Fix", "input": f"\n  \n{code}  \n\n", "reference": "r", "completions": {"full": "a"}},
               {"instruction": "Fix", "input": "\tx = 1\r\n\ty = 2", "reference": "r", "completions": {"full": "b"}}]
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(samples))
    rendered = markdown_it.MarkdownIt("commonmark").render(adapters_section([], None, path))
    blocks = [html.unescape(b) for b in re.findall(r"<pre><code>(.*?)</code></pre>", rendered, re.S)]
    assert blocks == [code + "\n", "\tx = 1\n\ty = 2\n"], blocks


def test_a_sweep_wide_adapter_option_keeps_the_rank_and_quantization_findings(tiny_config, tiny_data, tmp_path):
    """methods.lora.use_rslora: true (or use_dora, init) applies to every rank: the runs are lora-r8-rslora,
    lora-r16-rslora and qlora-r8-rslora, none plain. The findings compared plain runs only, so such a sweep's report
    had no rank step and no 4-bit finding at all, though its runs differ by rank and by quantization alone."""
    from lorasweep.collect import collect
    from lorasweep.config import operational, run_names, run_spec
    from lorasweep.train import train_run

    cfg = tiny_config(max_steps=2, evals=1)
    cfg["methods"]["full"]["enabled"] = False
    cfg["methods"]["lora"].update(ranks=[8, 16], use_rslora=True)
    runs = run_names(cfg)
    assert runs == ["lora-r8-rslora", "lora-r16-rslora", "qlora-r8-rslora"]
    paths = {}
    for run in runs:
        out = tmp_path / "runs" / run / "seed0"
        train_run(run_spec(cfg, run), tiny_data["train"], tiny_data["eval"], out, threads=2,
                  operational=operational(cfg))
        paths[run] = out
    df = collect([p / "metrics.json" for p in paths.values()], [p / "log_history.jsonl" for p in paths.values()],
                 tmp_path / "metrics.csv", tmp_path / "history.csv", [p / "eval_losses.json" for p in paths.values()],
                 tmp_path / "eval_losses.csv")
    lines = F.findings(df, pd.read_csv(tmp_path / "eval_losses.csv"))
    assert any(line.startswith("**r=8 → r=16** (rslora): eval loss") for line in lines), lines
    assert any(line.startswith("**4-bit (nf4) `qlora-r8-rslora` vs `lora-r8-rslora`**") for line in lines), lines
    # the write-ups trained plain LoRA: their claims are not checked on rsLoRA runs, and the report says why
    from lorasweep.report import writeups_section

    text = writeups_section(F.by_run(df), pd.read_csv(tmp_path / "eval_losses.csv"), df)
    assert "LoRA with PEFT's default options: a variant such as -rslora" in text


def test_the_setup_says_double_quant_and_gradient_checkpointing_as_the_runs_trained(tiny_config, tiny_data, tmp_path):
    """methods.qlora.double_quant and training.gradient_checkpointing change a run's memory (and checkpointing its
    time), but neither was recorded in the metrics nor said in the report: a sweep with both read as plain nf4
    without checkpointing."""
    from lorasweep.collect import collect
    from lorasweep.config import operational, run_spec
    from lorasweep.report import load, setup_section
    from lorasweep.train import train_run

    cfg = tiny_config(max_steps=1, evals=1, gradient_checkpointing=True)
    cfg["methods"]["full"]["enabled"] = False
    cfg["methods"]["qlora"]["double_quant"] = True
    paths = []
    for run in ("lora-r8", "qlora-r8"):
        out = tmp_path / "runs" / run / "seed0"
        m = train_run(run_spec(cfg, run), tiny_data["train"], tiny_data["eval"], out, threads=2,
                      operational=operational(cfg))
        assert m["gradient_checkpointing"] is True and m["double_quant"] == (True if run == "qlora-r8" else None)
        paths.append(out)
    collect([p / "metrics.json" for p in paths], [p / "log_history.jsonl" for p in paths], tmp_path / "metrics.csv",
            tmp_path / "history.csv")
    text = setup_section(load(tmp_path / "metrics.csv", tmp_path / "history.csv", tiny_data["summary"]))
    assert "precision fp32; gradient checkpointing on (" in text, text
    row = next(line for line in text.splitlines() if line.startswith("| qlora-r8 "))
    assert "| nf4 + double quant |" in row, row
    assert "double quant" not in next(line for line in text.splitlines() if line.startswith("| lora-r8 "))


def _long_history(metrics: pd.DataFrame, logs: int, logging_steps: int = 10, evals: int = 5) -> pd.DataFrame:
    """A history at the real experiment's size: ``logs`` training logs per run and seed (3 epochs of CodeAlpaca-20k
    at batch 8, logged every 10 steps: ~713), noisy around a falling curve, and ``evals`` evaluations."""
    import numpy as np

    rng = np.random.default_rng(0)
    steps = np.arange(1, logs + 1) * logging_steps
    rows = []
    for i, (run, seed) in enumerate(metrics[["run", "seed"]].itertuples(index=False)):
        level = 1.0 + 0.03 * (i % 5)
        loss = level + 0.5 * np.exp(-steps / 800) + rng.normal(0, 0.1, logs)
        rows += [{"run": run, "seed": seed, "step": int(s), "loss": float(v), "tokens_nonpad_seen": int(s) * 300}
                 for s, v in zip(steps, loss)]
        for e in np.linspace(0, steps[-1], evals + 1).astype(int):
            rows.append({"run": run, "seed": seed, "step": int(e), "eval_loss": level + 0.5 * math.exp(-e / 800),
                         "tokens_nonpad_seen": int(e) * 300})
    return pd.DataFrame(rows).sort_values(["run", "seed", "step"], kind="stable")


def _loss_curves(monkeypatch, tmp_path, metrics, history):
    """The loss-curve figure plot_all draws (its first), kept open."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics.to_csv(tmp_path / "metrics.csv", index=False)
    history.to_csv(tmp_path / "history.csv", index=False)
    closed = []
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig))
    plot_all(tmp_path / "metrics.csv", tmp_path / "history.csv", tmp_path / "figures")
    figs = [f for f in closed if f is not None]
    for f in figs[1:]:
        f.clf()
    return figs[0]


def test_the_train_loss_curves_stay_readable_at_the_real_experiments_size(monkeypatch, tmp_path):
    """~713 noisy training logs per run and seed (3 epochs, logging every 10 steps) drawn as they are bury the runs'
    differences in the noise, the last run drawn covering the others: each line is drawn as at most
    MAX_TRAIN_POINTS points, each the mean of k consecutive logs, and the panel says so; the evaluations stay as
    they are. A short history (the tiny preset's) is drawn log by log."""
    import numpy as np

    m, _ = _fixture()
    m3 = pd.concat([m.assign(seed=s) for s in (0, 1, 2)], ignore_index=True)
    fig = _loss_curves(monkeypatch, tmp_path, m3, _long_history(m3, 713))
    train_axes, eval_ax = [fig.axes[0], fig.axes[2]], fig.axes[1]
    for ax in train_axes:
        lines = [ln for ln in ax.lines if len(ln.get_xdata()) > 1]
        assert lines and all(len(ln.get_xdata()) <= 100 for ln in lines), [len(ln.get_xdata()) for ln in lines]
        # the mean of 8 logs: the noise (sd 0.1 per log) shrinks by about sqrt(8)
        noise = [np.std(np.diff(np.asarray(ln.get_ydata())[40:])) / 2**0.5 for ln in lines]
        assert max(noise) < 0.06, noise
    assert "mean of 8 consecutive logs" in fig.axes[0].get_title()
    assert all(len(ln.get_xdata()) <= 6 for ln in eval_ax.lines)  # evaluations: drawn as they are
    fig.clf()

    short = _loss_curves(monkeypatch, tmp_path, m, _long_history(m.assign(seed=0), 27))
    assert {len(ln.get_xdata()) for ln in short.axes[0].lines if len(ln.get_xdata()) > 1} == {27}
    assert "consecutive" not in short.axes[0].get_title()
    short.clf()


def test_a_busy_machine_is_named_once_per_run_with_three_seeds():
    """Five runs x three seeds all timed on a busy machine (a GPU host's other processes, as the recorded H200 sweep
    shows: 16-25% of its CPU): one clause per run naming its seeds, not fifteen (run, seed) clauses."""
    m, ev = _fixture()
    m3 = pd.concat([m.assign(seed=s) for s in (0, 1, 2)], ignore_index=True)
    m3["other_processes_cpu_share_pct"] = [20.0 + i for i in range(len(m3))]
    text = F.busy_machine(m3)
    for run in m["run"]:
        assert text.count(f"`{run}`") == 1, run
    assert "while `full` (seeds 0, 1 and 2) trained" in text
    top = m3.loc[m3["run"] == "full", "other_processes_cpu_share_pct"].max()
    assert f"up to {top:.0f}% of the CPU while `full`" in text
    assert len(text.split(". ")[0]) < 600
    m3.loc[m3["run"] != "lora-r8", "other_processes_cpu_share_pct"] = 1.0
    m3.loc[(m3["run"] == "lora-r8") & (m3["seed"] != 1), "other_processes_cpu_share_pct"] = 1.0
    assert "% of the CPU while `lora-r8` (seed 1) trained" in F.busy_machine(m3)


def test_a_model_built_with_random_weights_is_said_so_in_the_title_and_beside_the_writeups_verdicts(tmp_path):
    """The presets build a randomly initialised OPT: nothing in the report said so, while its samples were noise and
    its write-up verdicts ("full fine-tuning reached the lowest eval loss: agrees") read as tests of claims made on
    the pretrained opt-350m."""
    _, text = _render(tmp_path, random_weights=True)
    title = text.split("## Findings")[0]
    assert "**The model's weights are random**" in title and "not pretrained" in title
    claims = text.split("Their claims, checked against this sweep's measurements")[1]
    assert "random weights, unlike the pretrained opt-350m the write-ups fine-tuned" in claims
    _, plain = _render(tmp_path / "pretrained")
    assert "random" not in plain.split("## Findings")[0] and "unlike the pretrained" not in plain


def test_the_experiments_title_is_one_heading_line_shown_as_written():
    """``experiment`` went into the report's heading as Markdown: a title written in YAML's folded style (``>``, which
    ends it with a newline) or over two lines split the heading, its second line and ": full fine-tuning vs ..." a
    paragraph below it, and a ``<fp16>`` in it was raw HTML, which GitHub leaves out."""
    from lorasweep.report import load, title_section

    ctx = load(FIXTURE / "metrics.csv", FIXTURE / "log_history.csv", FIXTURE / "summary.json")
    heading, _, rest = title_section(ctx, "Ranks at <fp16>, *all-linear*\nover two lines\n").partition("\n\n")
    assert heading == "# Ranks at \\<fp16>, \\*all-linear\\* over two lines: full fine-tuning vs LoRA vs QLoRA"
    assert rest.startswith("`") and "\n\n" not in rest  # the paragraph below it, whole
    assert title_section(ctx, "fixture").startswith("# fixture: full fine-tuning vs LoRA vs QLoRA\n\n")


def test_the_tradeoffs_come_right_after_the_findings(rendered):
    """What each method costs and buys against full fine-tuning, the reader's question, sat sixth, after the setup,
    the tables, six figures and the memory model."""
    _, text = rendered
    assert text.index("## Findings") < text.index("## LoRA's trade-offs in this sweep") < text.index("## Setup")


def test_the_tradeoffs_set_trainable_parameters_beside_full_finetunings_and_the_table_says_what_its_share_is_of():
    """trainable_share_pct is PEFT's share of the adapted model's own parameters, adapter included: the fixture's
    lora-r256 trains 196,608 parameters, 99.3% of full fine-tuning's 198,080, which the trade-offs called "trains
    49.8% of the parameters" before "Against full fine-tuning"."""
    from lorasweep.report import results_table

    df, _ = _fixture()
    lines = {line.split("`")[1]: line for line in F.tradeoffs(df)}
    full, r256 = (df.set_index("run").loc[r, "trainable_params"] for r in ("full", "lora-r256"))
    assert (full, r256) == (198080, 196608)
    assert "trains 196,608 parameters, 99.3% as many as full fine-tuning" in lines["lora-r256"]
    assert "49.8%" not in lines["lora-r256"]
    assert "its saved adapter is 770 KiB against full fine-tuning's 778 KiB model (99.0%)" in lines["lora-r256"]
    notes = results_table(F.by_run(df))
    assert "*trainable*: trainable parameters and their share of the run's own parameters (adapter included" in notes
    assert "*eval loss*: mean cross-entropy per response token (nats)" in notes


def test_the_memory_figure_lists_only_the_predicted_parts_it_draws():
    """A part the memory model predicts as zero for every run draws no bar: it has no legend entry either."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorasweep.plots import _memory_figure, run_palette

    df = F.by_run(_fixture()[0])
    runs = list(df["run"])
    legend = lambda fig: [t.get_text() for t in fig.axes[1].get_legend().get_texts()]  # noqa: E731
    df["predicted_gradients_beyond_activations_bytes"] = 0.0
    fig = _memory_figure(df, runs, run_palette(runs), plt, 3)
    assert not [t for t in legend(fig) if "gradients" in t] and "predicted: AdamW state" in legend(fig)
    plt.close(fig)
    df.loc[df.index[0], "predicted_gradients_beyond_activations_bytes"] = 2.0**20
    fig = _memory_figure(df, runs, run_palette(runs), plt, 3)
    assert "predicted: gradients beyond the activations" in legend(fig)
    plt.close(fig)


def test_the_memory_figures_legends_stay_clear_of_their_axis_labels():
    """Each panel's legend sits under its x label, however short the figure (one run) and however many lines the
    label has (two with replicate seeds: "mean of 2 seeds ± sd"): a fixed share of the panel's height put the
    legend over the label in a sweep of up to three runs with seeds, and of one run alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorasweep.plots import _memory_figure, run_palette

    one, _ = _fixture()
    two, _ = _two_seeds()
    for per_seed in (two[two["run"].isin(["full", "lora-r8"])], two[two["run"].isin(["full", "lora-r8", "qlora-r8"])],
                     one[one["run"] == "full"], two):
        df = F.by_run(per_seed)
        runs = list(df["run"])
        fig = _memory_figure(df, runs, run_palette(runs), plt, 0.45 * len(runs) + 1.2, per_seed)  # plot_all's height
        fig.tight_layout()  # as plot_all saves it
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes[:2]:
            label = ax.xaxis.label.get_window_extent(renderer)
            legend = ax.get_legend().get_window_extent(renderer)
            assert legend.y1 <= label.y0 and legend.y0 >= 0, (runs, ax.get_xlabel(), label, legend)
        plt.close(fig)


def test_the_tradeoff_figure_says_what_its_error_bars_are():
    """With replicate seeds the trade-off figure draws ± one sd of the seeds both ways around each run's means; its
    panels say so, as the other figures with error bars do (with one seed: no error bars, no such words)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from lorasweep.plots import _tradeoff_figure, run_palette

    for per_seed, n in ((_fixture()[0], 1), (_two_seeds()[0], 2)):
        df = F.by_run(per_seed)
        runs = list(df["run"])
        fig = _tradeoff_figure(df, runs, run_palette(runs), plt, sns)
        bars = [c for ax in fig.axes[:2] for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        titles = [ax.get_title() for ax in fig.axes[:2]]
        if n == 1:
            assert not bars and not any("±" in t for t in titles)
        else:
            assert bars and all(f"mean ± sd over {n} seeds" in t for t in titles), titles
        plt.close(fig)


def test_the_rerun_command_for_one_run_names_every_seed_of_it():
    """"retrain one run" with replicate seeds retrains each of its seeds: naming the first seed's file alone retrains
    that replicate only (README: name one seed's file to retrain only that replicate), and a shell's seed* would
    also match the folder of a seed since taken out of `seeds`, which Snakemake then trains again."""
    import shlex

    from lorasweep.report import rerun_section

    m2, _ = _two_seeds()
    line = next(x for x in rerun_section({"metrics_per_seed": m2}, ["config/tiny.yaml"]).splitlines()
                if x.endswith("# retrain one run"))
    args = shlex.split(line.split("   # ")[0])
    named = args[args.index("--forcerun") + 1:args.index("--cores")]
    assert named == ["results/runs/lora-r8/seed0/metrics.json", "results/runs/lora-r8/seed1/metrics.json"], line
    one = m2[m2["seed"] == 0]  # one seed: its file
    line = next(x for x in rerun_section({"metrics_per_seed": one}).splitlines() if x.endswith("# retrain one run"))
    assert "--forcerun results/runs/lora-r8/seed0/metrics.json --cores" in line


def _three_seeds_one_lost():
    """The fixture trained with seeds 0, 1 and 2, where qlora-r8 lost seed 2 (3, 3, 3, 3 and 2 seeds), and its
    training logs for each of those seeds."""
    m, _ = _fixture()
    per_seed = pd.concat([m.assign(seed=s, eval_loss=m["eval_loss"] + 0.01 * s,
                                   peak_rss_bytes=m["peak_rss_bytes"] * (1 + 0.01 * s)) for s in (0, 1, 2)],
                         ignore_index=True)
    hist = pd.read_csv(FIXTURE / "log_history.csv")
    hist = pd.concat([hist.assign(seed=s) for s in (0, 1, 2)], ignore_index=True)
    lost = lambda t: (t["run"] == "qlora-r8") & (t["seed"] == 2)  # noqa: E731
    return per_seed[~lost(per_seed)], hist[~lost(hist)]


def test_figures_say_how_many_seeds_the_runs_had_when_a_run_lost_one(tmp_path):
    """Runs of 3, 3, 3, 3 and 2 seeds: the figures' titles said "3 seeds" (the most of any run) as if every run had
    them; they say 2–3 seeds, and 3 seeds where every run had 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from lorasweep.plots import _tradeoff_figure, run_palette

    per_seed, hist = _three_seeds_one_lost()
    assert F.by_run(per_seed)["n_seeds"].tolist() == [3, 3, 3, 3, 2]
    per_seed.to_csv(tmp_path / "metrics.csv", index=False)
    hist.to_csv(tmp_path / "log_history.csv", index=False)
    plot_all(tmp_path / "metrics.csv", tmp_path / "log_history.csv", tmp_path / "figures")
    # the SVGs draw text as paths, each after a comment that holds it
    texts = {name: re.findall(r"<!-- (.*?) -->", (tmp_path / "figures" / f"{name}.svg").read_text(encoding="utf-8"))
             for name in ("loss_curves", "memory", "tradeoff")}
    said = [t for ts in texts.values() for t in ts if "seeds" in t]
    assert said and not any(re.search(r"(?<![–\d])3 seeds", t) for t in said), said
    assert any(t.startswith("2–3 seeds per run") for t in texts["loss_curves"]), texts["loss_curves"]
    assert "measured: peak RSS (mean of 2–3 seeds ± sd)" in texts["memory"]
    assert "mean ± sd over 2–3 seeds (error bars, both axes)" in texts["tradeoff"]
    df = F.by_run(per_seed[per_seed["run"] != "qlora-r8"])  # 3 seeds each
    runs = list(df["run"])
    fig = _tradeoff_figure(df, runs, run_palette(runs), plt, sns)
    assert all("mean ± sd over 3 seeds" in ax.get_title() for ax in fig.axes[:2])
    plt.close(fig)


def test_the_memory_figures_legend_shows_its_kinds_of_bar_in_grey_whatever_colour_the_first_run_has():
    """The left panel's legend (at load / added by training: the bars' shades) took the first run's colour: in a
    sweep without full fine-tuning the lightest blue of lora-r8, at load faint at 35% and read as that run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from lorasweep.plots import _memory_figure, run_palette

    m = _fixture()[0]
    m = m[m["run"] != "full"]
    df = F.by_run(m)
    runs = list(df["run"])
    pal = run_palette(runs)
    fig = _memory_figure(df, runs, pal, plt, 3, m)
    legend = fig.axes[0].get_legend()
    kinds = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    assert set(kinds) == {"at load (model, runtime)", "added by training"}
    for handle in kinds.values():
        r, g, b, _ = to_rgba(handle.get_facecolor())
        assert r == g == b and r < 0.5, (r, g, b)  # a dark grey, not a run's colour
    assert to_rgba(kinds["at load (model, runtime)"].get_facecolor())[3] == pytest.approx(0.35)  # the bars' shade
    assert to_rgba(kinds["added by training"].get_facecolor())[3] == 1
    plt.close(fig)


def test_no_tick_label_title_or_legend_is_cut_off_at_the_saved_figures_edge_with_long_run_names(tmp_path):
    """A run named lora-r256-alpha512-dropout0.05-lr2e-4: its tick label narrowed the panels so far that the memory
    figure's right panel (its title and x label) and the runtime figure's x label hung over the figure's edge and
    the saved file cut them off (tight_layout lays panels out without their titles' and x labels' width). Every
    tick label, title, axis label and legend now lies inside the saved image, also for a name no hyphen breaks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.image import imread

    from lorasweep.plots import _bar, _memory_figure, _tradeoff_figure, run_palette, save_figure

    per_seed, _ = _three_seeds_one_lost()
    for long in ("lora-r256-alpha512-dropout0.05-lr2e-4", "lora-r256-pissa_niter_16_and_another_long_option"):
        m = per_seed.replace({"run": {"lora-r256": long}})
        df = F.by_run(m)
        runs = list(df["run"])
        pal = run_palette(runs)
        h = 0.45 * len(runs) + 1.2
        figures = {"memory": _memory_figure(df, runs, pal, plt, h, m),
                   "tradeoff": _tradeoff_figure(df, runs, pal, plt, sns)}
        for col in ("train_runtime_s", "train_tokens_nonpad_per_s"):
            figures[col], ax = plt.subplots(figsize=(7, h))
            _bar(ax, m, col, pal, "train runtime, evals and checkpoints excluded (s)", runs)
        for name, fig in figures.items():
            png = save_figure(fig, tmp_path, name)[0]
            width, height = fig.get_size_inches() * 120  # the PNG's dpi: the saved image is the whole figure
            assert imread(png).shape[:2] == pytest.approx((height, width), abs=1), (long, name)
            renderer = FigureCanvasAgg(fig).get_renderer()  # closed: a canvas of its own to measure it on
            inside = fig.bbox.padded(0.5)  # display pixels, half a pixel's rounding
            drawn = []
            for ax in fig.axes:
                for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
                    at = lambda t: t.get_position()[axis is ax.yaxis]  # noqa: E731
                    drawn += [t for t in axis.get_ticklabels()  # those drawn: inside the panel's limits
                              if t.get_text() and min(low, high) <= at(t) <= max(low, high)]
                drawn += [t for t in (ax.title, ax.xaxis.label, ax.yaxis.label, ax.get_legend()) if t is not None]
            shown = [t.get_text() for t in drawn if hasattr(t, "get_text")] + [
                t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
            assert long in [t.replace("\n", "") for t in shown], (name, shown)  # as a tick label or in the legend
            for artist in drawn:
                box = artist.get_window_extent(renderer)
                assert (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0
                        and box.y1 <= inside.y1), (long, name, getattr(artist, "get_text", type)(), box, fig.bbox)


def test_the_reports_title_names_the_runs_that_had_fewer_seeds():
    """Runs of 3, 3, 3, 3 and 2 seeds: the title said each run was trained with 3 seeds (the most of any run, with
    the first run's list); it names the run that had fewer and its seeds."""
    from lorasweep import report

    per_seed, _ = _three_seeds_one_lost()
    ctx = {"metrics": F.by_run(per_seed), "data": json.loads((FIXTURE / "summary.json").read_text())}
    title = report.title_section(ctx, "x")
    assert "each trained with 3 seeds (0,1,2), except `qlora-r8` with 2 (0,1) (figures are means" in title, title
    everyone = F.by_run(per_seed[per_seed["run"] != "qlora-r8"])
    title = report.title_section({**ctx, "metrics": everyone}, "x")
    assert "each trained with 3 seeds (0,1,2) (figures are means" in title and "except" not in title, title


H200 = REPO / "benchmarks" / "results" / "h200-2026-11-27b-five-run-sweep-x10"


def _h200():
    from lorasweep import report as R

    return R.load(f"{H200}-metrics.csv", f"{H200}-log-history.csv.gz", f"{H200}-data-summary.json",
                  f"{H200}-eval-losses.csv.gz")


def test_runs_timed_under_the_same_load_share_its_figure_not_repeat_it():
    """The recorded H200 sweep, every run beside 4 other jobs on its GPU and other processes taking 24% of the CPU
    during most: the findings read "up to 24% and 24% of the CPU respectively" and "beside up to 4, 4, 4, 4 and 4
    other training job(s)"."""
    from lorasweep import report as R

    findings = R.findings_section(_h200())
    assert not re.search(r"up to (\d+%?)(, \1)* and \1 ", findings), findings
    assert ("`lora-r8` and `lora-r128` each timed on a busy machine, other processes taking up to 24% of the CPU; "
            "`lora-r8` and `lora-r128` each timed beside up to 4 other training job(s) on its GPU") in findings
    # figures that differ are still given run by run
    assert "other processes taking up to 25%, 24%, 24%, 24% and 16% of the CPU respectively" in findings


def test_negative_numbers_are_written_with_a_minus_sign_as_the_reports_subtractions_are(tmp_path):
    """The report writes 'peak_rss_bytes − rss_at_load_bytes' and ± spreads with their own signs, but its signed
    figures came from Python's '+' format with a hyphen: "6.915 → 4.390 (-2.524)", "(Δ -0.0011 ± 0.0085", "-2%"."""
    md, text = _render(tmp_path)
    assert re.search(r"\(−\d\.\d{3}\)", text)  # a loss falling from its untrained start
    prose = re.sub(r"`[^`]*`", "", text)  # code (commands, column names, options) keeps its hyphens
    assert not re.findall(r"(?<![\w.-])-\d", prose), re.findall(r".{30}(?<![\w.-])-\d.{10}", prose)
    from lorasweep import report as R

    errors = R.memory_model_section(_h200()["metrics"])
    assert "| −2%" in errors and "-2%" not in errors


def test_the_sweeps_row_beside_the_writeups_has_no_parentheses_in_parentheses(tmp_path):
    """On the CPU the hardware is 'CPU (x86_64, 2 threads)': the write-ups table's source read
    'lorasweep (CPU (x86_64, 2 threads))'."""
    md, text = _render(tmp_path)
    sources = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| lorasweep (")]
    assert sources and all(not re.search(r"\([^()]*\(", s) for s in sources), sources
    assert any(re.fullmatch(r"lorasweep \(CPU, [^()]+, \d+ threads\)", s) for s in sources), sources


def _captured_figures(monkeypatch, tmp_path):
    """The figures plot_all draws from the recorded H200 sweep, by name, as they were saved."""
    import lorasweep.plots as P

    figures, save = {}, P.save_figure

    def keep(fig, out_dir, name):
        figures[name] = fig
        return save(fig, out_dir, name)

    monkeypatch.setattr(P, "save_figure", keep)
    plot_all(f"{H200}-metrics.csv", f"{H200}-log-history.csv.gz", tmp_path)
    return figures


def test_runs_are_told_apart_by_marker_as_well_as_by_colour(monkeypatch, tmp_path):
    """The LoRA ranks differ in colour only by lightness, and in the recorded H200 sweep their points overlap
    (lora-r128's behind qlora-r8's at 4.35 GiB, the three at ~250 s): every run drew the same round marker, and
    the loss curves' legend showed colour alone. Each run now has its own marker, in the trade-off's points, the
    eval curves and both legends."""
    figures = _captured_figures(monkeypatch, tmp_path)
    runs = ["full", "lora-r8", "lora-r128", "lora-r256", "qlora-r8"]
    for name, ax in (("tradeoff", figures["tradeoff"].axes[1]), ("loss_curves", figures["loss_curves"].axes[1])):
        legend = ax.get_legend()
        marks = {t.get_text(): h.get_marker() for t, h in zip(legend.get_texts(), legend.legend_handles)}
        assert len({marks[r] for r in runs}) == len(runs), (name, marks)
    # the eval curves draw those markers (the runs' lines of the top right panel)
    drawn = {line.get_marker() for line in figures["loss_curves"].axes[1].get_lines() if len(line.get_xdata()) > 1}
    assert len(drawn) == len(runs), drawn


def test_the_memory_models_parts_stay_apart_for_colour_vision_deficiencies(monkeypatch, tmp_path):
    """The memory figure's stacked parts, simulated for protanopia, deuteranopia and tritanopia (Machado, Oliveira
    and Fernandes 2009, full severity, on linear RGB), stay at least 15 apart in CIELAB: the AdamW state (seaborn's
    orange) beside the activations (its green) came out 7 apart with protanopia, the thin AdamW slice of a LoRA bar
    lost in its activations."""
    import numpy as np
    from matplotlib.colors import to_rgb

    machado = {"protan": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                          [-0.003882, -0.048116, 1.051998]],
               "deutan": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                          [-0.011820, 0.042940, 0.968881]],
               "tritan": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                          [0.004733, 0.691367, 0.303900]]}

    def lab(rgb, m):
        c = np.asarray(rgb)
        linear = np.clip(np.asarray(m) @ np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4), 0, 1)
        xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
        t = xyz / np.array([0.95047, 1.0, 1.08883])
        f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
        return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])

    legend = _captured_figures(monkeypatch, tmp_path)["memory"].axes[1].get_legend()
    parts = {t.get_text(): to_rgb(h.get_facecolor()) for t, h in zip(legend.get_texts(), legend.legend_handles)
             if t.get_text().startswith("predicted")}
    assert "predicted: AdamW state" in parts and "predicted: activations" in parts, parts
    for kind, m in machado.items():
        for a in parts:
            for b in parts:
                if a < b:
                    assert np.linalg.norm(lab(parts[a], m) - lab(parts[b], m)) >= 15, (kind, a, b)


def test_the_report_kernel_imports_the_lorasweep_that_renders_the_report(tmp_path):
    """A Snakemake script job finds lorasweep in the workflow's checkout through the folders Snakemake appends to its
    sys.path (lorasweep not installed, or installed editable from another checkout: README, check_jobs_import), but
    the notebook's kernel is a fresh Python that gets none of them: with lorasweep not installed the report job
    failed at the notebook's ``from lorasweep import report`` (ModuleNotFoundError; seen with a venv holding only the
    dependencies), and beside an editable install of another checkout the report ran that checkout's code. A second
    checkout here, appended to the job's sys.path as Snakemake does; the kernel must import that one."""
    import subprocess
    import sys

    import nbformat

    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "lorasweep", checkout / "lorasweep", ignore=shutil.ignore_patterns("__pycache__"))
    template = tmp_path / "t.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import lorasweep\nfrom IPython.display import Markdown, display\n"
                                          "display(Markdown('kernel: ' + lorasweep.__file__))")]
    nbformat.write(nb, template)
    code = ("import sys; sys.path.extend(sys.argv[1:2]); import lorasweep; print(lorasweep.__file__); "
            "from lorasweep.report import render_report; "
            "render_report(sys.argv[2], sys.argv[3] + '/out.ipynb', sys.argv[3] + '/out.md')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(checkout), str(template), str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(checkout / "lorasweep" / "__init__.py")  # the job's, as under Snakemake
    assert (tmp_path / "out.md").read_text().strip() == f"kernel: {checkout / 'lorasweep' / '__init__.py'}"
