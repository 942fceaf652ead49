"""The benchmark scripts run end to end at tiny sizes on a CPU. They exist for the day a GPU is
lent (minutes of device time): a script that breaks there wastes them. Speed is not checked here."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_4b_tiny(tmp_path):
    """The 4B benchmark's --tiny run, and its first section's check: the fast cache decodes the same tokens
    as the simple one (fp32, CPU), with and without blocks."""
    out = tmp_path / "bench.json"
    text = run("bench/bench_4b.py", "--tiny", "--skip", "attention", "--out", str(out))
    results = json.loads(out.read_text())
    equal = {k: v for k, v in results.items() if k.startswith("equal/tiny fp32/")}
    assert len(equal) == 3 and all(v["identical"] == 1.0 and v["max_logprob_diff"] < 1e-5 for v in equal.values())
    assert {"decode/1", "decode/8", "decode/paths", "grpo/lora", "grpo/full", "sft/full"} <= set(results), text


def test_bench_sampler_small():
    text = run("bench/bench_sampler.py", "--only", "a,b,c,d,e", "--repeats", "1", "--max-new-tokens", "8",
               "--prefixes", "32", "--path-tokens", "4", "--hidden", "32", "--layers", "1")
    for part in ("(a)", "(b)", "(c)", "(d)", "(e)"):
        assert f"\n{part} " in text, text
