"""The benchmark scripts run as documented (tiny settings): they measure what they say, in the same units."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO


def _head() -> str | None:
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return git.stdout.strip() if git.returncode == 0 else None


def _run(script, tmp_path, *args, env=None):
    out = tmp_path / "result.json"
    argv = [*map(str, args), "--json", str(out)]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *argv], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # every result says how to make it again: its command, from which folder, at which commit (test below); run
    # from another folder than the checkout's, the script's path in the command is absolute (reruns from cwd)
    prov = r.pop("provenance")
    assert prov["command"] == shlex.join(["python", str(REPO / "benchmarks" / script), *argv]) and prov["argv"] == argv
    assert prov["cwd"] == str(tmp_path) and prov["git_commit"] == _head()
    return r, proc.stdout


def test_throughput_benchmark_compares_both_recipes_on_the_same_tokens(tiny_data, tmp_path):
    from lorasweep.data import prepare

    n_train = prepare(tiny_data["source"], tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "s.json",
                      eval_size=0.05, seed=0)["train_examples"]  # as the benchmark prepares it
    epoch = -(-n_train // 8)
    r, stdout = _run("throughput.py", tmp_path, "--data", tiny_data["source"], "--steps", epoch, "--repeats", 1,
                     "--max-length", 128)
    assert set(r["median_tokens_per_s"]) == {"plain", "plain, checkpointing off", "lorasweep"}
    # one epoch each: the same examples, so the same non-padding tokens (plain's counted as its collator builds
    # batches, lorasweep's as its step feeds them)
    assert len({t for runs in r["tokens_per_run"].values() for t in runs}) == 1
    assert "not a whole number of epochs" not in stdout
    # against the faster plain variant: TRL's default checkpointing (2-3x slower on a GPU) credits lorasweep with nothing
    med = r["median_tokens_per_s"]
    assert r["speedup"] == med["lorasweep"] / max(med["plain"], med["plain, checkpointing off"])
    assert r["speedup_vs"] == {k: med["lorasweep"] / med[k] for k in ("plain", "plain, checkpointing off")}
    assert r["speedup_baseline"] == max(("plain", "plain, checkpointing off"), key=med.get)
    assert "speed-up of lorasweep over the plain recipe" in stdout and "the faster plain variant" in stdout
    # every recipe scored the untrained model before training, the same: the same model, eval examples and loss
    base = [run["base_eval_loss"] for runs in r["runs"].values() for run in runs]
    assert len(base) == 3 and max(base) - min(base) < 1e-6 * base[0] and base[0] > r["mean_eval_loss"]["plain"]
    assert set(r["base_eval_loss"]) == set(med) and "scored the untrained model differently" not in stdout
    assert "(one seed: no interval" in stdout and "nan" not in stdout and "1 seeds" not in stdout
    assert set(r["peak_rss_gib"]) == set(r["median_tokens_per_s"]) and min(r["peak_rss_gib"].values()) > 0.1
    assert "peak_cuda_gib" not in r and "mfu" not in r  # CUDA-only figures are absent on the CPU, never 0
    assert r["warmup_steps"] == 0 and "warm-up" not in stdout  # no warm-up run on the CPU unless asked


def test_throughput_benchmark_compares_with_the_plain_recipe_without_checkpointing_alone(tiny_data, tmp_path):
    # as on the GPUs (benchmarks/results/h200-*-plain-vs-lorasweep.json): the plain recipe without TRL's checkpointing
    r, stdout = _run("throughput.py", tmp_path, "--data", tiny_data["source"], "--steps", 2, "--repeats", 1,
                     "--max-length", 64, "--recipes", "plain-nockpt,lorasweep")
    med = r["median_tokens_per_s"]
    assert r["speedup"] == med["lorasweep"] / med["plain, checkpointing off"]
    assert r["speedup_baseline"] == "plain, checkpointing off" and "eval_loss_diff_lorasweep_minus_plain" in r
    assert "speed-up of lorasweep over the plain recipe" in stdout and "faster plain variant" not in stdout


def test_throughput_benchmark_passes_training_and_lora_settings_to_lorasweeps_recipe(tiny_data, tmp_path):
    from lorasweep.config import run_spec
    from lorasweep.speed import single_run_config

    r, stdout = _run("throughput.py", tmp_path, "--data", tiny_data["source"], "--steps", 6, "--repeats", 1,
                     "--max-length", 128, "--recipes", "lorasweep", "--training", "pad_to_multiple_of=64",
                     "--training", "logging_steps=1", "--run", "lora-r4", "--lora", "dropout=0", "--warmup-steps", 2)
    assert r["lorasweep_training"] == {"pad_to_multiple_of": 64, "logging_steps": 1}
    # an untimed warm-up run before the timed one (on CUDA by default: the first steps there load the kernels)
    assert r["warmup_steps"] == 2 and "warm-up: 2 untimed steps of lorasweep" in stdout
    assert len(r["runs"]["lorasweep"]) == 1
    assert r["lorasweep_lora"] == {"dropout": 0}
    run = r["runs"]["lorasweep"][0]
    assert run["tokens_padded"] % (64 * 8) == 0 and run["steady_tokens_per_s"] > 0
    assert 0 < run["trainable"] < run["params"] / 10  # a LoRA run
    spec = run_spec(single_run_config("m", "t.jsonl", "lora-r4", lr=1e-3, device="cpu", seed=0,
                                      lora={"dropout": 0.0}), "lora-r4")
    assert spec["lora"]["dropout"] == 0.0 and spec["lora"]["r"] == 4  # --lora reaches the run's adapter
    assert "(second half" in stdout
    assert "6 steps of batch 8 are not a whole number of epochs" in stdout  # the recipes would see other examples


def test_throughput_benchmark_counts_the_tensor_reads_of_each_recipes_step(tiny_data, tmp_path):
    r, stdout = _run("throughput.py", tmp_path, "--data", tiny_data["source"], "--steps", 6, "--repeats", 1,
                     "--max-length", 128, "--recipes", "plain,lorasweep", "--host-reads")
    per_step = {name: sum(runs[0]["host_reads_per_step"].values()) for name, runs in r["runs"].items()}
    # every step, the plain recipe's Trainer checks the logged loss for NaN, transformers checks the mask and
    # TRL reads its loss metrics; lorasweep's step does none of these (its one read is the Trainer's total
    # loss, once a run)
    assert per_step["plain"] > 8 and 0 < per_step["lorasweep"] <= 1 / 6
    assert any(site.startswith("transformers/trainer.py") for site in r["runs"]["plain"][0]["host_reads_per_step"])
    assert "tensor values read by the host per training step" in stdout


def test_scaling_benchmark_trains_one_epoch_per_fraction_and_reuses_tokenization(tiny_data, tmp_path):
    r, _ = _run("scaling.py", tmp_path, "--data", tiny_data["source"], "--fractions", 0.5, 1.0, "--max-length", 128)
    small, large = r["fractions"]
    assert small["train_examples"] < large["train_examples"] and small["steps"] < large["steps"]
    assert r["rerun_on_largest"]["tokens"] == large["tokens"]  # the same epoch again


def test_op_count_benchmark_counts_more_operations_for_lora(tmp_path):
    r, stdout = _run("op_count.py", tmp_path, "--layers", 2, "--batch", 2, "--length", 16)
    full, lora, nodrop = r["full"], r["lora-r8"], r["lora-r8, dropout 0"]
    # the adapters' products and dropout against the weight gradients and their casts saved
    assert 0 < full["ops_not_views"] <= nodrop["ops_not_views"] < lora["ops_not_views"] <= lora["ops"]
    assert lora["mm"] > full["mm"]  # the adapters' small products outnumber the weight gradients saved
    # an fp32 frozen base costs a cast of each linear layer's weight and bias at every forward: 2 x 6 x 2 layers
    assert r["lora-r8, fp32 base"]["ops_not_views"] == lora["ops_not_views"] + 24
    assert r["lora-r8, fp32 base"]["mm"] == lora["mm"]
    # QLoRA's 4-bit layers fed bf16 (lorasweep's default) launch fewer operations than bitsandbytes' fp32 round trip
    assert 0 < r["qlora-r8"]["ops_not_views"] < r["qlora-r8, 4-bit outputs fp32"]["ops_not_views"]
    assert "not views" in stdout


def test_predict_memory_benchmark_shows_what_16bit_frozen_weights_save(tmp_path):
    r, stdout = _run("predict_memory.py", tmp_path, "--runs", "full", "lora-r8", "qlora-r8", "--batch", 2,
                     "--length", 64, "--frozen-16bit", "both")
    p = {name: run for name, run in r["runs"].items()}
    assert set(p) == {"full", "lora-r8", "lora-r8, frozen_weights_16bit off", "qlora-r8",
                      "qlora-r8, frozen_weights_16bit off"}
    saved, weights = "predicted_saved_for_backward_bytes", "predicted_weights_bytes"
    # QLoRA's 4-bit layers fed bf16 keep what LoRA keeps; bitsandbytes' fp32 outputs keep more
    assert p["qlora-r8"][saved] == p["lora-r8"][saved] < p["qlora-r8, frozen_weights_16bit off"][saved]
    # an fp32 LoRA base: autocast's 16-bit copies of it kept for the backward pass, and twice the bytes stored
    assert p["lora-r8"][saved] < p["lora-r8, frozen_weights_16bit off"][saved]
    assert p["qlora-r8"][weights] < p["lora-r8"][weights] < p["lora-r8, frozen_weights_16bit off"][weights]
    assert p["full"]["predicted_optimizer_bytes"] > 10 * p["lora-r8"]["predicted_optimizer_bytes"]
    assert "batch 2 x 64 tokens, bf16" in stdout and r["model"] == "OPT of the tiny shape"


def test_predict_memory_benchmark_predicts_for_a_given_model(tiny_model, tmp_path):
    r, stdout = _run("predict_memory.py", tmp_path, "--model", tiny_model, "--runs", "lora-r8", "--batch", 2,
                     "--length", 32, "--precision", "fp32")
    p = r["runs"]["lora-r8"]
    assert r["model"] == str(tiny_model) and p["predicted_for_seq_len"] == 32
    assert p["predicted_peak_bytes"] > p["predicted_weights_bytes"] > 0 and str(tiny_model) in stdout


def test_cpu_rss_benchmark_reports_every_pass(tmp_path):
    r, stdout = _run("cpu_rss.py", tmp_path, "--run", "lora-r8", "--passes", 2, "--layers", 2, "--hidden", 64,
                     "--vocab", 500, "--length", 64)
    assert [p["peak_rss_above_base_bytes"] >= 0 and p["seconds"] > 0 for p in r["passes"]] == [True, True]
    logits = 8 * 64 * 500 * 4  # batch x length x vocab in fp32: resident at once in every forward pass
    assert all(p["peak_rss_above_base_bytes"] >= logits for p in r["passes"])
    assert "pass 2:" in stdout


def test_compile_graphs_benchmark_finds_the_cuda_graph_blockers_a_regional_compile_avoids(tiny_data, tmp_path):
    whole, stdout = _run("compile_graphs.py", tmp_path, "--data", tiny_data["source"], "--steps", 4)
    assert whole["graphs_compiled"] > 0 and whole["graph_breaks"] > 0 and whole["graphs_with_mutated_inputs"] > 0
    assert all("chunked_logprob.py" in where for where in whole["mutated_at"])  # TRL's loss, not the model
    assert "mutated at: trl/kernels/chunked_logprob.py" in stdout
    regional, _ = _run("compile_graphs.py", tmp_path, "--data", tiny_data["source"], "--steps", 4,
                       "--training", "torch_compile_regional=true")
    assert regional["graphs_compiled"] > 0
    assert regional["graph_breaks"] == 0 and regional["graphs_with_mutated_inputs"] == 0


def test_on_a_known_gpu_the_benchmark_and_the_run_report_mfu_and_the_speed_bound(tiny_data, tmp_path, monkeypatch,
                                                                               capsys):
    """The GPU-only figures' plumbing, run on the CPU with the machine taken for an H100 (a real tiny training
    run; only the hardware's name is stood in): what a lent GPU's session would otherwise find broken."""
    import importlib.util

    import lorasweep.train as train
    from lorasweep import speed

    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    h100 = "NVIDIA H100 80GB HBM3"
    real = train.hardware
    monkeypatch.setattr(train, "hardware", lambda device: {**real(device), "gpu_name": h100})
    monkeypatch.setattr(throughput, "hardware_label", lambda hw: h100)
    monkeypatch.chdir(tmp_path)
    r = throughput.main(["--data", str(tiny_data["source"]), "--steps", "6", "--repeats", "1", "--max-length", "128",
                         "--recipes", "lorasweep", "--run", "lora-r8", "--json", str(tmp_path / "r.json"),
                         "--training", "precision=bf16"])  # MFU is against the 16-bit peak: 16-bit training only
    out = capsys.readouterr().out
    run = r["runs"]["lorasweep"][0]
    assert run["precision"] == "bf16"
    tokens_per_step = run["tokens"] / run["steps"]
    assert run["frozen_16bit"] > 0  # a LoRA base under bf16: stored in bf16, 4 bytes a weight a step
    shape = run["flop_shape"]  # the LM head on the labelled positions only, embedding tables left out
    assert 0 < shape["labelled_share"] < 1 and shape["lm_head_params"] > 0 and shape["lm_head_trainable_params"] == 0
    bound = speed.step_ceiling(total_params=run["params"], trainable_params=run["trainable"], quantized_params=0,
                               tokens_per_step=tokens_per_step, half=True, gpu_name=h100,
                               frozen_16bit_params=run["frozen_16bit"], flop_shape=shape)
    assert r["mfu_bound"]["mfu_ceiling_pct"] == pytest.approx(100 * bound["mfu"])
    # the benchmark's MFU counts as the workflow's runs do: 4 FLOPs per weight and token, 6 per trainable one, the
    # head only where it projects
    body = run["params"] - shape["embedding_table_params"] - shape["lm_head_params"]
    flops = 4 * body + 2 * run["trainable"] + shape["labelled_share"] * 4 * shape["lm_head_params"]
    assert r["mfu"]["lorasweep"] == pytest.approx(flops * r["median_tokens_per_s"]["lorasweep"] / 989e12)
    assert "MFU lorasweep" in out
    assert f"bound at {tokens_per_step:,.0f} tokens a step: {100 * bound['mfu']:.1f}% MFU" in out


def test_host_time_benchmark_times_lorasweeps_step_and_a_bare_loop_on_the_same_model(tiny_data, tmp_path):
    r, stdout = _run("host_time.py", tmp_path, "--data", tiny_data["source"], "--layers", 2, "--steps", 4,
                     "--repeats", 1, "--max-length", 128, "--trainer-walks")
    assert r["trainer_walks_ms_per_step"] > 0 and len(r["walks_saved_ms_per_step_each"]) == 1
    assert "with the Trainer's walks over every module" in stdout
    w = r["walk_costs"]
    assert w["modules"] > 0 and w["parameter_tensors"] > 0 and all(w[f"{k}_ms"] > 0 for k in
                                                              ("train", "zero_grad", "list_parameters", "num_parameters"))
    assert r["lorasweep_ms_per_step"] > 0 and r["bare_ms_per_step"] > 0
    phases = r["bare_phases_ms_per_step"]
    assert set(phases) == {"forward", "backward", "clip", "optimizer"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= r["bare_ms_per_step"]  # the phases are parts of the step
    assert r["tokens"]["bare"] > 4 * 8 and "added by the Trainer, TRL's loss and lorasweep" in stdout


@pytest.mark.parametrize("run", ["lora-r8", "qlora-r8"])
def test_host_time_benchmark_pairs_a_16bit_frozen_base_with_an_fp32_one(tiny_data, tmp_path, run):
    r, stdout = _run("host_time.py", tmp_path, "--data", tiny_data["source"], "--layers", 2, "--steps", 4,
                     "--repeats", 1, "--max-length", 128, "--run", run, "--precision", "bf16",
                     "--fp32-frozen-base")  # the script itself refuses the pair if their losses differ
    assert r["run"] == run and r["precision"] == "bf16" and r["fp32_frozen_base_ms_per_step"] > 0
    assert len(r["frozen_16bit_saved_ms_per_step_each"]) == 1 and r["bare_ms_per_step"] > 0
    assert "with frozen_weights_16bit off" in stdout and "same losses" in stdout


def test_throughput_benchmark_profiles_the_steps_asked_for_and_the_summary_reads_them(tiny_data, tmp_path):
    prof = tmp_path / "prof"
    _run("throughput.py", tmp_path, "--data", tiny_data["source"], "--steps", 8, "--repeats", 1, "--max-length", 128,
         "--recipes", "lorasweep", "--profile", prof, "--profile-steps", "2,3")
    meta = json.loads((prof / "profile.json").read_text())
    assert (meta["first_step"], meta["steps"], meta["device"]) == (3, 3, "cpu") and meta["wall_ms_per_step"] > 0
    assert "aten::mm" in (prof / "ops.txt").read_text()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_summary.py"), prof, "--json",
                           tmp_path / "s.json", "--top", "1000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "s.json").read_text())
    ops = {o["name"]: o for o in s["host_ops_by_self_ms_per_step"]}
    # a forward and backward pass of the 2-layer model a step: matrix products, each step's own
    assert ops["aten::mm"]["calls_per_step"] >= 4 and ops["aten::mm"]["ms_per_step"] > 0
    # every profiled step draws its batch inside the window, once, and runs its optimizer once
    fetch = next(o for name, o in ops.items() if name.startswith("enumerate(DataLoader)"))
    assert fetch["calls_per_step"] == 1 and ops["Optimizer.step#AdamW.step"]["calls_per_step"] == 1
    assert sum(o["ms_per_step"] for o in ops.values()) <= s["wall_ms_per_step"] * 1.05  # self times do not overlap
    assert "gpu_busy_ms_per_step" not in s  # no device side on the CPU, not a zero


def test_profile_summary_merges_overlapping_kernels_and_names_the_operator_each_wait_was_in(tmp_path):
    import gzip

    ev = [  # one step of 10 ms (times in microseconds)
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 3000, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 100, "dur": 20, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 4000, "dur": 2000, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::_local_scalar_dense", "ts": 4100, "dur": 1800, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 4200, "dur": 1500, "tid": 1},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 200, "dur": 2000, "tid": 7},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1200, "dur": 2000, "tid": 8},  # overlaps: 3 ms busy
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 4150, "dur": 30, "tid": 1},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 5600, "dur": 100, "tid": 7},
        # the profiler's own synchronisation at the end of the window: outside every operator, not a wait
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 9000, "dur": 900, "tid": 1},
    ]
    (tmp_path / "profile.json").write_text(json.dumps({"first_step": 1, "steps": 1, "wall_s": 0.01,
                                                        "wall_ms_per_step": 10.0, "device": "cuda"}))
    with gzip.open(tmp_path / "trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    proc = subprocess.run([sys.executable, "benchmarks/profile_summary.py", tmp_path, "--json",
                           tmp_path / "s.json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "s.json").read_text())
    prov = s.pop("provenance")  # the command and commit; not this machine's hardware: the trace's was another
    # run from the checkout, as benchmarks/README says: the script's path from there, as typed
    assert prov["command"] == shlex.join(["python", "benchmarks/profile_summary.py", str(tmp_path), "--json",
                                          str(tmp_path / "s.json")]) and "hardware" not in prov
    assert s["gpu_busy_ms_per_step"] == pytest.approx(3.1) and s["gpu_busy_share_pct"] == pytest.approx(31)
    assert s["host_waits_by_site"] == [{"site": "aten::_local_scalar_dense (cudaStreamSynchronize)",
                                        "per_step": 1.0, "ms_per_step": 1.5}]
    assert (s["launches_per_step"], s["kernels_per_step"], s["async_copies_per_step"]) == (1, 2, 1)
    ops = {o["name"]: o["ms_per_step"] for o in s["host_ops_by_self_ms_per_step"]}
    assert ops == pytest.approx({"aten::mm": 3.0, "aten::item": 0.2, "aten::_local_scalar_dense": 1.8})
    assert "GPU busy 3.1 ms a step (31% of the wall clock)" in proc.stdout


def test_rss_noise_retrains_the_same_run_identically_in_fresh_processes(tmp_path):
    r, stdout = _run("rss_noise.py", tmp_path, "--runs", "lora-r8", "--repeats", 2)
    run = r["runs"]["lora-r8"]
    assert run["same_eval_loss"] and len(run["mib"]) == 2 and min(run["mib"]) > 1  # MiB above the process's start
    assert run["range"] == max(run["mib"]) - min(run["mib"]) == r["widest_range_mib"]
    assert "widest range" in stdout


def test_benchmark_results_record_the_command_commit_packages_and_machine_they_came_from(tiny_data, tmp_path):
    """A result in benchmarks/results is only as good as the means to make it again: each script writes, beside
    its figures, the command line, the folder its relative paths start from, the commit (and whether the checkout
    had changes), package versions, the environment variables that change the measurement, and the machine."""
    import importlib.metadata
    from datetime import datetime

    _run("throughput.py", tmp_path, "--data", tiny_data["source"], "--steps", 2, "--repeats", 1, "--max-length", 64,
         "--recipes", "lorasweep", env={"MALLOC_MMAP_THRESHOLD_": "1048576"})
    prov = json.loads((tmp_path / "result.json").read_text())["provenance"]  # _run checked command, cwd, commit
    assert isinstance(prov["git_dirty"], bool) and datetime.fromisoformat(prov["date"]).tzinfo is not None
    assert {k: prov["packages"][k] for k in ("torch", "transformers", "peft", "trl")} == {
        k: importlib.metadata.version(k) for k in ("torch", "transformers", "peft", "trl")}
    assert prov["env"]["MALLOC_MMAP_THRESHOLD_"] == "1048576"  # glibc's threshold moves every RSS figure
    hw = prov["hardware"]
    assert hw["device"] == "cpu" and hw["cpu_count"] == os.cpu_count() and hw["torch_threads"] >= 1 and hw["python"]
    # the one script meant to run another checkout's code (PYTHONPATH): its own helper, and what it imported
    _run("concurrent_prep.py", tmp_path, "--data", tiny_data["source"], "--repeat", 1, "--runs", "full",
         "--max-length", 64)
    prov = json.loads((tmp_path / "result.json").read_text())["provenance"]
    assert prov["packages"]["torch"] == importlib.metadata.version("torch") and "hardware" in prov


def test_the_lorasweep_version_recorded_is_the_imported_packages(tmp_path):
    """PYTHONPATH at another checkout (as concurrent_prep.py is meant to run): the provenance names that checkout
    (lorasweep_path) and its package's version, not the version of the distribution installed in the environment,
    which is another lorasweep."""
    import shutil

    copy = tmp_path / "other-checkout" / "lorasweep"
    shutil.copytree(REPO / "lorasweep", copy, ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "99.'))
    code = ("import json, sys; from lorasweep.provenance import benchmark_provenance; "
            f"print(json.dumps(benchmark_provenance({str(REPO / 'benchmarks' / 'op_count.py')!r}, [], None)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(copy.parent)}, cwd=tmp_path, check=True)
    prov = json.loads(proc.stdout)
    assert prov["lorasweep_path"] == str(copy) and prov["packages"]["lorasweep"].startswith("99."), prov


def test_a_copy_of_the_checkout_inside_another_repository_records_no_commit(tmp_path):
    """A copy of the working tree without its .git (as an offline GPU machine gets) placed in another repository's
    folder (a home folder kept in git, a project that vendors it): its provenance named that repository's commit,
    and "not dirty", as if the benchmark had run that code. A folder the repository tracks is still its commit."""
    import shutil

    from lorasweep.provenance import benchmark_provenance, git_state

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "notes.txt").write_text("another project\n")
    git("add", "notes.txt")
    git("commit", "-q", "-m", "other")
    copy = tmp_path / "lorasweep-copy"
    shutil.copytree(REPO / "benchmarks", copy / "benchmarks")
    prov = benchmark_provenance(copy / "benchmarks" / "op_count.py", [], None)
    assert prov["git_commit"] is None and prov["git_dirty"] is None, prov
    assert git_state(tmp_path) == {"git_commit": git("rev-parse", "HEAD"), "git_dirty": False}
