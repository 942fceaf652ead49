"""Tests for nanopr1/recipes.py: each (stage, variant) resolves to the paper's reward, clip and
starting checkpoint; explicit flags win; the toy preset changes defaults only; --help shows the table."""

import argparse

import pytest

from conftest import ROOT, run
from nanopr1 import recipes, toy
from nanopr1.format import PARALLEL_PROMPT, SEQUENTIAL_PROMPT


def rl_parser():
    """The flags of train_rl.py that recipes touch, with the script's defaults."""
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=["toy"])
    p.add_argument("--stage", choices=["easy", "hard"], default="hard")
    p.add_argument("--variant", choices=["seen", "unseen"], default="seen")
    for flag in ("init", "out", "data", "reward", "group-size", "prompts-per-step", "steps", "clip-high"):
        p.add_argument(f"--{flag}")
    p.add_argument("--lr", type=float, default=1e-6)
    for flag in ("max-new-tokens", "answer-reserve", "micro-batch-tokens", "eval-n", "save-every", "max-prompt-tokens"):
        p.add_argument(f"--{flag}", type=int, default=0)
    p.add_argument("--eval-data", default="aime25")
    p.add_argument("--eval-limit", type=int)
    return p


@pytest.mark.parametrize("argv, expected", [
    (["--stage", "easy"], dict(init="out/sft", data="gsm8k", reward="parallel", clip_high=0.2, group_size=5,
                               prompts_per_step=1024, steps=35)),
    (["--stage", "hard"], dict(init="out/rl-easy", data="dapo", reward="accuracy", clip_high=0.2, group_size=8,
                               prompts_per_step=512, steps=300)),
    (["--stage", "hard", "--variant", "unseen"], dict(init="out/sft-unseen", data="dapo", reward="alternating",
                                                      clip_high=0.28, group_size=8, out="out/rl-unseen")),
    (["--variant", "unseen", "--reward", "scaffold", "--clip-high", "0.2"], dict(reward="scaffold", clip_high="0.2")),
    (["--preset", "toy", "--stage", "easy"], dict(init="out/toy-sft", data="toy:easy", reward="parallel", lr=5e-5,
                                                  max_new_tokens=toy.MAX_NEW_TOKENS, prompts_per_step=16)),
    (["--preset", "toy", "--variant", "unseen", "--lr", "1e-3"], dict(init="out/toy-sft-unseen", reward="alternating",
                                                                      clip_high=0.28, lr=1e-3)),
])
def test_rl_recipes(argv, expected):
    args = recipes.parse(rl_parser(), argv, "train_rl")
    assert {k: getattr(args, k) for k in expected} == expected and args.script == "train_rl"


def test_the_preset_leaves_the_parser_as_it_was():
    p = rl_parser()
    assert recipes.parse(p, ["--preset", "toy"], "train_rl").lr == 5e-5
    assert recipes.parse(p, [], "train_rl").lr == 1e-6


@pytest.mark.parametrize("flags, expected", [
    (dict(preset=None), PARALLEL_PROMPT),
    (dict(preset=None, no_parallel=True), SEQUENTIAL_PROMPT),
    (dict(preset="toy"), toy.TEMPLATE),
    (dict(preset="toy", prompt_file="FILE"), "Q: {problem}\nA:"),  # an explicit flag beats the preset
])
def test_template(tmp_path, flags, expected):
    (tmp_path / "t.txt").write_text("Q: {problem}\nA:")
    if flags.get("prompt_file"):
        flags["prompt_file"] = str(tmp_path / "t.txt")
    assert recipes.template(argparse.Namespace(**flags)) == expected


def test_help_shows_the_recipes():
    out = run(ROOT / "train_rl.py", "--variant", "unseen", "--stage", "hard", "--help").stdout
    assert "hard   unseen   out/sft-unseen     dapo   alternating (S2)           8      512      300    0.28" in out
    assert "--clip-high" in out and "--answer-reserve" in out
