"""Tests for nanopr1/recipes.py: each (stage, variant) resolves to the paper's reward, clip and
starting checkpoint; explicit flags win; the toy preset changes defaults only; --help shows the table."""

import runpy

import pytest

from conftest import ROOT, run
from nanopr1 import recipes, toy
from nanopr1.format import PARALLEL_PROMPT, SEQUENTIAL_PROMPT


def rl_args(argv):
    """train_rl.py's flags, with the preset's and the recipe's defaults (its own parse_args)."""
    return runpy.run_path(str(ROOT / "train_rl.py"), run_name="not_main")["parse_args"](argv)


@pytest.mark.parametrize("argv, expected", [
    (["--stage", "easy"], dict(init="out/sft", data="gsm8k", reward="parallel", clip_high=0.2, group_size=5,
                               prompts_per_step=1024, steps=35, grader="gsm8k", rules="official")),
    (["--stage", "hard"], dict(init="out/rl-easy", data="dapo", reward="accuracy", clip_high=0.2, group_size=8,
                               prompts_per_step=256, mini_batches=2, steps=300, grader="dapo")),
    (["--stage", "hard", "--variant", "unseen"], dict(init="out/sft-unseen", data="dapo", reward="alternating",
                                                      clip_high=0.28, group_size=8, out="out/rl-unseen")),
    (["--variant", "unseen", "--reward", "accuracy"], dict(reward="accuracy", clip_high=0.2)),  # S1
    (["--stage", "easy", "--grader", "is_equiv"], dict(grader="is_equiv")),
    (["--variant", "unseen", "--reward", "scaffold", "--clip-high", "0.2"], dict(reward="scaffold", clip_high=0.2)),
    (["--preset", "toy", "--stage", "easy"], dict(init="out/toy-sft", data="toy:easy", reward="parallel", lr=5e-5,
                                                  max_new_tokens=toy.MAX_NEW_TOKENS, prompts_per_step=16)),
    (["--preset", "toy", "--variant", "unseen", "--lr", "1e-3"], dict(init="out/toy-sft-unseen", reward="alternating",
                                                                      clip_high=0.28, lr=1e-3)),
])
def test_rl_recipes(argv, expected):
    args = rl_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected and args.script == "train_rl"


def test_the_preset_leaves_the_parser_as_it_was_and_typed_flags_are_known():
    p = runpy.run_path(str(ROOT / "train_rl.py"), run_name="not_main")["parser"]
    toy_args = recipes.parse(p, ["--preset", "toy", "--lr=2e-5", "--mini-b", "1"], "train_rl")
    assert toy_args.lr == 2e-5 and toy_args.mini_batches == 1 and toy_args.max_new_tokens == toy.MAX_NEW_TOKENS
    assert toy_args._typed == {"preset", "lr", "mini_batches"}  # (abbreviated too)
    assert recipes.parse(p, [], "train_rl").lr == 1e-6 and recipes.parse(p, [], "train_rl")._typed == set()
    assert recipes.parse(p, ["--lr", "-1e-4"], "train_rl")._typed == {"lr"}  # a negative value: typed too


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
    assert recipes.template(flags.get("prompt_file"), flags["preset"] == "toy", flags.get("no_parallel")) == expected


def test_help_shows_the_recipes():
    out = run(ROOT / "train_rl.py", "--variant", "unseen", "--stage", "hard", "--help").stdout
    assert "hard   unseen   out/sft-unseen  dapo   alternating  dapo    8      256      300    0.28" in out
    assert "--reward accuracy --init out/rl-unseen-200 --out out/rl-scaffold" in out  # the scaffold's 2nd run
    assert "--clip-high" in out and "--answer-reserve" in out
