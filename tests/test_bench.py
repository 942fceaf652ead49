"""The benchmark scripts run end to end at tiny sizes on a CPU. They exist for the day a GPU is
lent (minutes of device time): a script that breaks there wastes them. Speed is not checked here."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["equal", "decode_1", "decode_4", "decode_8", "grpo_lora", "grpo_full", "train_rl"]  # --tiny's


def run(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is as fast, and immune to a busy machine
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_4b_tiny(tmp_path):
    """The 4B benchmark's --tiny run, the very code of the GPU run: every section ok, and its first section's
    check: the captured decode step gives the same tokens and log-probs as the eager one (fp32), with
    admissions, Seen and Unseen blocks."""
    out = tmp_path / "bench.json"
    text = run("bench/bench_4b.py", "--tiny", "--repeats", "1", "--out", str(out))
    results = json.loads(out.read_text())
    assert {k: results[k]["status"] for k in SECTIONS} == dict.fromkeys(SECTIONS, "ok"), text
    equal = {k: v for k, v in results["equal"].items() if k.startswith("tiny fp32/")}
    assert len(equal) == 3 and all(v["identical"] == 1.0 and v["max_logprob_diff"] < 1e-5 for v in equal.values())
    assert all(v["graphs"] >= 1 and "graph_error" not in v for v in equal.values())  # the captured path ran
    assert equal["tiny fp32/seen blocks"]["blocks"] > 0 and equal["tiny fp32/unseen blocks"]["blocks"] > 0
    d = results["decode_4"]
    assert d["graphs"]["captures_in_repeats"] == 0 and d["eager"]["graphs"] == 0 and d["graphs"]["graphs"] >= 1
    assert d["plan_pool_gb"] > 0  # beside the measured graph_pool_gb
    assert results["grpo_full"]["peak_above_states_gb"] > 0 and results["grpo_lora"]["plan_transient_gb"] > 0
    rl = results["train_rl"]
    assert rl["metrics"]["step"] == 1, rl  # train_rl.py really ran a step
    # the KV cache it chose (on a GPU also the measured step, beside the plan), and its checkpoint's size
    assert [x.split(":")[0] for x in rl["measured"]] == ["KV cache"] and rl["checkpoint_gb"] > 0, rl
    assert not out.with_name("bench.json.tmp").exists()
    for part in ["[equal]", *(f"[{k}]" for k in SECTIONS[1:]), "every section ok"]:
        assert part in text, text


def test_bench_4b_failed_section_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    """A section that fails (here: out of memory half-way) is recorded with its error line and what it had
    measured; the JSON is on disk before the next section starts; skipped sections are marked."""
    spec = importlib.util.spec_from_file_location("bench_4b", ROOT / "bench" / "bench_4b.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, seen = tmp_path / "b.json", []

    def broken(args, res):
        """(x) runs out of memory"""
        res["measured_before"] = 1.5
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore lines")

    def after(args, res):
        """(y) runs after it"""
        seen.append(json.loads(out.read_text()))
        res["value"] = 2

    bench.run_sections({"broken": broken, "later": after, "after": after},
                       argparse.Namespace(skip="later", out=str(out)))
    assert seen[0]["broken"]["status"] == "failed" and "after" not in seen[0]
    results = json.loads(out.read_text())
    assert results["broken"]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB"
    assert results["broken"]["measured_before"] == 1.5
    assert results["later"] == {"status": "skipped"} and results["after"]["status"] == "ok"
    assert results["after"]["value"] == 2


def test_bench_sampler_small():
    text = run("bench/bench_sampler.py", "--only", "a,b,c,d,e", "--repeats", "1", "--max-new-tokens", "8",
               "--prefixes", "32", "--path-tokens", "4", "--hidden", "32", "--layers", "1", "--columns", "64,300")
    for part in ("(a)", "(b)", "(c)", "(d)", "(e)"):
        assert f"\n{part} " in text, text
    assert "\n  default : no row cap" in text and "\n  captured: no row cap" in text, text  # (e) both ways
