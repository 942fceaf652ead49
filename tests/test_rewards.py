"""Tests for nanopr1/rewards.py: answer extraction and grading (table-driven, with
adversarial cases, each response tokenized into a rollout), the paper's graders (dapo, gsm8k)
against the official functions, the reward functions and schedules, rollouts graded from their
tag tokens (real tags vs the same tags spelled as text), your own rewards and graders
(module:function, tests/custom_rewards.py) and their one-line errors, and the real teacher traces."""

import functools
import importlib.util
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import custom_rewards
from conftest import shared_file
from nanopr1 import UsageError, data, rewards
from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, TAGS, normalize, tag_ids
from nanopr1.grpo import group_advantages
from nanopr1.rewards import (SCHEDULES, clean_answer, extract_answer, is_equiv,
                             is_tiered_step, last_boxed, parse_number, resolve, reward_fn,
                             reward_rollout)
from nanopr1.rollout import make_rollout

BLOCK = "<Parallel><Path>{p1}</Path><Path>{p2}</Path></Parallel><Summary>{s}</Summary>"


def block(p1="a", p2="b", s="s"):
    return BLOCK.format(p1=p1, p2=p2, s=s)


def tokenized(tokenizer, text, spelled=False):
    """The rollout of a response text: its tags as tag tokens (or spelled with sub-word pieces)."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=spelled)["input_ids"]
    return make_rollout(tokenizer, [], ids, "budget")


def grade(tokenizer, text, gold, spelled=False):
    """Is the final answer of a response text correct, graded as a rollout is?"""
    return reward_rollout(tokenized(tokenizer, text, spelled), gold)[1]["correct"]


# (response, gold, correct)
GRADE_CASES = [
    # plain and wrapped integers
    ("Final Answer: 42", "42", True),
    ("Final Answer: 41", "42", False),
    ("Final Answer: $42", "42", True),
    ("Final Answer: \\$42", "42", True),
    ("Final Answer: $42$", "42", True),
    ("Final Answer: \\(42\\)", "42", True),
    ("Final Answer: \\[42\\]", "42", True),
    ("Final Answer: \\boxed{42}", "42", True),
    ("Final Answer: $\\boxed{42}$", "42", True),
    ("Final Answer: \\boxed{\\text{42}}", "42", True),
    ("Final Answer: \\text{42}", "42", True),
    ("Final Answer: **42**", "42", True),
    ("Final Answer: 42.", "42", True),
    ("Final Answer: 42 apples", "42", True),
    ("Final Answer: 42 dollars.", "42", True),
    ("Final Answer: 42 \\text{ cm}", "42", True),
    ("Final Answer: 18 (eighteen)", "18", True),
    ("Final Answer: The total is 19 pets.", "19", True),
    ("Final Answer: x = 42", "42", True),
    ("Final Answer: $x=42$", "42", True),
    ("Final Answer: 3 + 4 = 7", "7", True),
    ("Final Answer: 42.0", "42", True),
    ("Final Answer: 42.00", "42", True),
    ("Final Answer: +42", "42", True),
    ("Final Answer: 0", "0", True),
    ("Final Answer: -0", "0", True),
    ("Final Answer: 50\\%", "50", True),
    ("Final Answer: 90^\\circ", "90", True),
    ("Final Answer: 42\nThanks for reading! 41", "42", True),
    # thousands separators, also in the gold answer
    ("Final Answer: 1,080", "1080", True),
    ("Final Answer: 1080", "1,080", True),
    ("Final Answer: $1,080.00", "1080", True),
    ("Final Answer: 1{,}080", "1080", True),
    ("Final Answer: 1\\,080", "1080", True),
    ("Final Answer: 1,000,000", "1000000", True),
    ("Final Answer: 12,34", "12", False),
    # negative answers
    ("Final Answer: -7", "-7", True),
    ("Final Answer: \u22127", "-7", True),  # unicode minus
    ("Final Answer: $-7$", "-7", True),
    ("Final Answer: 7", "-7", False),
    ("Final Answer: -7", "7", False),
    # fractions and decimals, by value
    ("Final Answer: \\frac{3}{4}", "3/4", True),
    ("Final Answer: 0.75", "\\frac{3}{4}", True),
    ("Final Answer: \\dfrac{3}{4}", "0.75", True),
    ("Final Answer: \\frac34", "0.75", True),
    ("Final Answer: -\\frac{1}{2}", "-0.5", True),
    ("Final Answer: \\frac{-1}{2}", "-1/2", True),
    ("Final Answer: \\frac{1}{2}", "-1/2", False),
    ("Final Answer: 3/4", "4/3", False),
    ("Final Answer: 2.5", "5/2", True),
    ("Final Answer: .5", "1/2", True),
    ("Final Answer: 1/0", "1", False),
    ("Final Answer: 18", "18.0", True),
    ("Final Answer: 18", "$18", True),
    # a number glued to more math is not the answer
    ("Final Answer: 3x", "3", False),
    ("Final Answer: 2^{10}", "2", False),
    ("Final Answer: 5 - 3", "5", False),
    ("Final Answer: \\sqrt{3}", "3", False),
    ("Final Answer: \\frac{\\sqrt{3}}{2}", "3", False),
    ("Final Answer: 6 and 7", "7", False),
    # a ratio or a time is not the number before its colon; as a string it still matches itself
    ("Final Answer: 2:3", "2", False),
    ("Final Answer: 10:30", "10", False),
    ("Final Answer: 2 : 3", "2", False),
    ("Final Answer: 2:3", "2:3", True),
    ("Final Answer: 10:30", "10:30", True),
    ("Final Answer: 42: the number of apples", "42", True),  # a colon with no number after it
    # a leading sign keeps its number; an operator before the number makes it an operand
    ("Final Answer: - 7", "-7", True),
    ("Final Answer: - 7", "7", False),
    ("Final Answer: $- 7$", "-7", True),
    ("Final Answer: x - 7", "7", False),
    ("Final Answer: x < 5", "5", False),
    ("Final Answer: 2 * 21", "2", False),
    # mixed numbers, LaTeX or plain
    ("Final Answer: 2\\frac{1}{2}", "5/2", True),
    ("Final Answer: 2\\frac{1}{2}", "21/2", False),
    ("Final Answer: 2 \\frac{1}{2}", "2.5", True),
    ("Final Answer: -2\\frac{1}{2}", "-5/2", True),
    ("Final Answer: -2\\frac{1}{2}", "-3/2", False),
    ("Final Answer: 2\\frac12", "5/2", True),
    ("Final Answer: 2 1/2", "5/2", True),
    ("Final Answer: 2 1/2", "2", False),
    ("Final Answer: 3\\frac{1}{2}", "3", False),
    # hedging: a list of candidates earns nothing, whichever is gold
    ("Final Answer: 6 or 7", "6", False),
    ("Final Answer: 6, 7", "6", False),
    ("Final Answer: 6; 7", "6", False),
    ("Final Answer: 1, 2, 3, 4, 5", "1", False),
    ("Final Answer: 42, which is the total", "42", True),
    # non-numeric answers: cleaned strings
    ("Final Answer: \\text{B}", "B", True),
    ("Final Answer: C", "B", False),
    # case and layout of the answer line
    ("final answer: 42", "42", True),
    ("FINAL ANSWER : 42", "42", True),
    ("Final Answer:\n42", "42", True),
    ("Final Answer:\n\\[\n\\boxed{42}\n\\]", "42", True),
    ("Final Answer:\n$$\n42\n$$", "42", True),
    ("Final  answer : 42", "42", True),
    # markdown bold around the prefix
    ("**Final Answer**: 42", "42", True),
    ("**Final Answer:** 42", "42", True),
    ("**Final Answer:**\n\n42", "42", True),
    ("**Final Answer:** **42**", "42", True),
    ("__Final Answer:__ 42", "42", True),
    ("The answer is 42", "42", False),  # no Final Answer, no \boxed
    # several Final Answer lines: the last one counts
    ("Final Answer: 5\nwait, let me redo it.\nFinal Answer: 7", "7", True),
    ("Final Answer: 5\nwait, let me redo it.\nFinal Answer: 7", "5", False),
    # the right number only inside a path or a summary does not count
    ("x" + block(p1="Final Answer: 42") + "Final Answer: 41", "42", False),
    ("x" + block(p1="Final Answer: 42", p2="Final Answer: 42"), "42", False),
    ("x" + block(s="Final Answer: 42"), "42", False),
    ("x" + block(p1="\\boxed{42}") + "so", "42", False),
    ("x<Parallel><Path>Final Answer: 42</Path><Path>y", "42", False),        # unclosed block
    ("x<Parallel><Path>a</Path><Path>b</Path></Parallel><Summary>Final Answer: 42", "42", False),  # unclosed summary
    ("x" + block(p1="Final Answer: 41") + "Final Answer: 42", "42", True),
    ("Final Answer: 42" + block(p1="Final Answer: 41"), "42", True),
    # \boxed{} fallback (main text only, when there is no Final Answer)
    ("so the answer is \\boxed{42}.", "42", True),
    ("first \\boxed{41}, no: \\boxed{42}", "42", True),
    ("\\boxed{42} but Final Answer: 41", "42", False),
    ("\\boxed{\\frac{1}{2}}", "1/2", True),
    ("\\boxed{42", "42", False),  # truncated
    ("\\boxed{}", "42", False),
    ("Final Answer: \\boxed{}\n42", "42", False),  # an empty box is the answer line: nothing after it counts
    ("Final Answer: \\boxed{2:3}", "2", False),
    # empty, huge and tag-only responses
    ("", "42", False),
    ("   \n\n", "42", False),
    ("Final Answer:", "42", False),
    ("Final Answer: ", "0", False),
    (block(p1="", p2="", s=""), "42", False),
    ("<Parallel><Path></Path></Parallel>", "42", False),
    ("</Summary></Path><Path>", "42", False),
    ("x" * 50_000 + "\nFinal Answer: 42", "42", True),
    ("1 " * 25_000, "1", False),
    ("Final Answer: " + "9" * 50_000, "42", False),
    ("<Parallel>" * 10_000 + "Final Answer: 42", "42", False),
]


# a tag spelled (sub-word pieces) in the main text next to the answer
SPELLED_CASES = [("Final Answer: 42</Summary>", "42", True), ("Final Answer: 4</Path>2", "42", False)]


@pytest.mark.parametrize("text,gold,correct", GRADE_CASES, ids=[f"{i}" for i in range(len(GRADE_CASES))])
def test_grade(bpe_tokenizer, text, gold, correct):
    assert grade(bpe_tokenizer, text, gold) is correct


@pytest.mark.parametrize("text,gold,correct", SPELLED_CASES)
def test_grade_spelled_tags(bpe_tokenizer, text, gold, correct):
    assert grade(bpe_tokenizer, text, gold, spelled=True) is correct


def test_enough_cases():
    assert len(GRADE_CASES) + len(SPELLED_CASES) >= 60


def test_huge_responses_are_fast(bpe_tokenizer):
    texts = ["x" * 50_000, "1," * 25_000, "<Parallel>" * 5_000, "\\boxed{" * 7_000, "Final Answer: " * 3_500]
    rollouts = [tokenized(bpe_tokenizer, t) for t in texts] + [tokenized(bpe_tokenizer, texts[2], True)]
    start = time.perf_counter()
    for r in rollouts:
        reward_rollout(r, "42")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("main,answer", [  # extract_answer reads main text: what is displayed is what is graded
    ("Final Answer: 42 apples\nmore", "42 apples"),
    ("Final Answer:  \\boxed{7}  ", "\\boxed{7}"),
    ("Final Answer: 1\nmore\nFinal Answer:  -3 \ntrailing", "-3"),
    ("final answer: 12", "12"),
    ("**Final Answer**: 42", "42"),
    ("**Final Answer:** 42", "42"),
    ("Final Answer:\n\\[\n\\boxed{42}\n\\]", "\\boxed{42}"),
    ("no answer here", None),
    ("", None),
    ("Final Answer:", None),
    ("Final Answer:\n**\n", None),
    ("use \\boxed{a{b}c} here", "a{b}c"),
    ("use \\boxed{} here", None),
    # a spelled tag in the main text is plain text: the answer after it counts
    ("x<Parallel><Path>Final Answer: 1", "1"),
    ("<Summary>Final Answer: 1</Summary>", "1</Summary>"),
])
def test_extract_answer(main, answer):
    assert extract_answer(main) == answer


@pytest.mark.parametrize("s,value", [
    ("$1,080.", 1080), ("\\boxed{-\\frac{3}{4}}", -0.75), ("\\(42\\)", 42), ("x = -5", -5), ("3x", None),
    ("", None), ("abc", None),
])
def test_parse_number(s, value):
    assert parse_number(clean_answer(s)) == value


def test_last_boxed_nested_and_unclosed():
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None
    assert last_boxed("nothing") is None

# -----------------------------------------------------------------------------
# the paper's graders, dapo (hard stage, benchmarks) and gsm8k (easy stage): the whole response

PAD = "y" * 250  # an answer 250 characters from the end: inside dapo's last 300

# (response, gold, dapo, gsm8k): the expected verdicts are those of the official functions
# (verl's math_dapo.compute_score "acc" and gsm8k_add_special_token_reward.extract_solution == gold),
# run once on each rollout's plain text and written here
PAPER_CASES = [
    ("Final Answer: 42", "42", True, True),
    ("Final Answer: 41", "42", False, False),
    ("Final Answer: 42.", "42", False, False),
    ("Final Answer: 42.0", "42", False, False),
    ("**Final Answer:** 42", "42", False, False),
    ("**Final Answer**: 42", "42", False, False),
    ("**Final Answer:** **42**", "42", False, False),
    ("so the answer is \\boxed{42}.", "42", False, False),
    ("\\boxed{42}", "42", False, False),
    ("Final Answer: \\boxed{42}", "42", True, False),
    ("Final Answer: $\\boxed{42}$", "42", True, False),
    ("Final Answer: 0.75", "\\frac{3}{4}", False, False),
    ("Final Answer: \\frac{3}{4}", "\\frac{3}{4}", True, False),
    ("Final Answer: \\frac34", "\\frac{3}{4}", True, False),
    ("Final Answer: \\dfrac{3}{4}", "\\frac{3}{4}", False, False),
    ("Final Answer: 3/4", "\\frac{3}{4}", False, False),
    ("final answer: 42", "42", True, False),
    ("FINAL ANSWER: 42", "42", True, False),
    ("Final answer: 42", "42", True, False),
    ("Final Answer : 42", "42", True, False),
    ("Final  Answer: 42", "42", False, False),
    ("Final Answer:\n42", "42", True, True),
    ("Final Answer:42", "42", True, True),
    ("Final Answer: $42$", "42", True, False),
    ("Final Answer: \\$42", "42", True, False),
    ("Final Answer: $42", "42", True, False),
    ("Final Answer: 42", "$42", True, False),
    ("Final Answer: 1,080", "1080", True, True),
    ("Final Answer: 1080", "1,080", True, False),
    ("Final Answer: 1,000,000", "1000000", True, True),
    ("Final Answer: $1,080.00", "1080", False, False),
    ("Final Answer: -7", "-7", True, True),
    ("Final Answer: -7", "7", False, False),
    ("Final Answer: \u22127", "-7", False, False),
    ("Final Answer: $-7$", "-7", True, False),
    ("Final Answer: 42 dollars", "42", True, True),
    ("Final Answer: 42 apples", "42", False, True),
    ("Final Answer: 42 \\text{ cm}", "42", True, True),
    ("Final Answer: 90^\\circ", "90", True, True),
    ("Final Answer: 50\\%", "50", False, True),
    ("Final Answer: 12 inches", "12", True, True),
    ("Final Answer: x = 42", "42", True, False),
    ("Final Answer: 3 + 4 = 7", "7", True, False),
    ("Final Answer: 4 2", "42", True, False),
    ("Final Answer: The answer is 42", "42", False, False),
    ("Final Answer: 42\nThanks for reading! 41", "42", True, True),
    ("Final Answer: \\sqrt{2}", "\\sqrt{2}", True, False),
    ("Final Answer: \\sqrt2", "\\sqrt{2}", True, False),
    ("Final Answer: 2\\sqrt{3}", "2\\sqrt{3}", True, False),
    ("Final Answer: \\text{(A)}", "(A)", True, False),
    ("Final Answer: \\textbf{B}", "B", True, False),
    ("Final Answer: 12.5", "12.5", True, True),
    ("Final Answer: 5\nwait, let me redo it.\nFinal Answer: 7", "7", True, False),
    ("Final Answer: 5\nwait, let me redo it.\nFinal Answer: 7", "5", False, True),
    ("Final Answer: x\nFinal Answer: 42", "42", True, True),
    ("final answer: 5\nFinal Answer: 42", "42", True, True),
    ("x" + block(p1="Final Answer: 42") + "so", "42", False, True),
    ("x" + block(s="Final Answer: 42") + "so", "42", False, True),
    ("x" + block(p1="Final Answer: 41") + "Final Answer: 42", "42", False, False),
    ("Final Answer: 42" + block(p1="Final Answer: 41"), "42", False, True),
    ("x" + block(p1="Final Answer: 42", p2="Final Answer: 41") + "done", "41", False, False),
    ("Final Answer: 42\n" + "x" * 400, "42", False, True),
    ("Final Answer: 42\n" + PAD, "42", True, True),
    ("Final Answer: 42\n" + "x" * 284, "42", False, True),
    ("Final Answer: 42\n" + "x" * 283, "42", True, True),
    ("Final Answer: 7\n" + PAD + "\nFinal Answer: 42", "7", False, True),
    ("x" + block(p1="Final Answer: 42\n") + "so", "42", True, True),
    ("x" + block(s="the sum is 42.\nFinal Answer: 42\n") + "Done.", "42", True, True),
    ("Final Answer: 41\n" + block(p1="Final Answer: 42\n", p2="Final Answer: 42\n") + "ok", "42",
     True, False),
    ("Final Answer: 10 minutes", "10", True, True),
    ("Final Answer: a 42", "42", True, False),
    ("Final Answer: \\overline{42}", "42", True, False),
    ("Final Answer: 1,2", "12", True, True),
    ("Final Answer: 2, 3", "2,3", True, False),
    ("Final Answer: **42**", "42", False, False),
    ("Final Answer: \\frac{1}{2}", "1/2", False, False),
    ("Final Answer: 1/2", "1/2", True, False),
    ("Final Answer: 42 \\text{m}", "42", True, True),
    ("", "42", False, False),
    ("Final Answer:", "42", False, False),
    ("Final Answer: ", "42", False, False),
    ("The answer is 42", "42", False, False),
    (block(p1="", p2="", s=""), "42", False, False),
    ("Final Answer: 42<Parallel>", "42", True, True),
]


def plain(text):
    """A response text without its tags: what skip_special_tokens decodes of its rollout."""
    return re.sub("|".join(map(re.escape, TAGS)), "", text)


@pytest.mark.parametrize("text,gold,by_dapo,by_gsm8k", PAPER_CASES,
                         ids=[f"{i}" for i in range(len(PAPER_CASES))])
def test_paper_graders(bpe_tokenizer, text, gold, by_dapo, by_gsm8k):
    ro = tokenized(bpe_tokenizer, text)
    assert ro.plain_text == plain(text)  # paths and summaries kept, tags gone
    assert rewards.grade(ro, gold, rewards.dapo)[0] is by_dapo
    assert rewards.grade(ro, gold, rewards.gsm8k)[0] is by_gsm8k


def test_enough_paper_cases():
    assert len(PAPER_CASES) >= 80
    both = [(d, g) for _, _, d, g in PAPER_CASES]
    assert all(pair in both for pair in itertools.product([True, False], repeat=2))  # they disagree both ways


def test_grade_answer_is_what_the_grader_compared(bpe_tokenizer):
    ro = tokenized(bpe_tokenizer, "x" + block(p1="Final Answer: 41\n") + "So\n**Final Answer:** 42")
    assert rewards.grade(ro, "42", rewards.dapo) == (False, "**42")  # the normalised last answer
    assert rewards.grade(ro, "41", rewards.gsm8k) == (True, "41")  # the first, in a path
    assert rewards.grade(ro, "42", is_equiv) == (True, "42")  # the main line's answer
    assert rewards.grade(ro, "42", None) == (True, "42")  # None: is_equiv
    assert rewards.grade(tokenized(bpe_tokenizer, "no answer"), "42", rewards.dapo) == (False, None)
    assert rewards.grade(ro, None, rewards.dapo) == (False, "**42")  # no gold: not correct, answer read


def test_reward_rollout_with_a_paper_grader(bpe_tokenizer):
    """The grader's verdict and answer reach the metrics; the block still comes from the tag tokens."""
    ro = rollout(bpe_tokenizer, ["x", *real_block(p1="Final Answer: 42\n"), "so"])
    assert reward_rollout(ro, "42")[1]["correct"] is False  # is_equiv: the main line has no answer
    r, m = reward_rollout(ro, "42", "parallel", grader=rewards.dapo)  # dapo reads the path
    assert (r, m["correct"], m["answer"], m["has_answer"], m["has_block"]) == (1.0, True, "42", True, True)
    spelled = tokenized(bpe_tokenizer, "x" + block(p1="Final Answer: 42\n"), spelled=True)
    assert spelled.plain_text == "x" + block(p1="Final Answer: 42\n")  # spelled tags are text
    r, m = reward_rollout(spelled, "42", "parallel", grader=rewards.gsm8k)
    assert (r, m["correct"], m["has_block"]) == (-1.0, True, False)  # correct, but no block: no pay


def test_easy_reward_one_zero_and_plus_minus_one_give_the_same_advantages():
    """The official easy reward pays 1 / 0, nanopr1's +1 / -1: GRPO's advantages agree to the epsilon."""
    groups = [list(bits) for bits in itertools.product([0.0, 1.0], repeat=5)]
    official = group_advantages([r for g in groups for r in g], 5)
    ours = group_advantages([2 * r - 1 for g in groups for r in g], 5)
    assert torch.allclose(official[0], ours[0], atol=1e-5) and official[1] == ours[1] == 2
    assert (official[0] != 0).any()


# the official functions, read from a git copy of the release at test time
MIRROR = Path(__file__).resolve().parents[2] / ".mirror" / "zhengkid+Parallel-R1" / "repo"
OFFICIAL_GIT = Path(os.environ.get("PARALLEL_R1_GIT_DIR", MIRROR))
OFFICIAL = {"dapo": "verl/verl/utils/reward_score/math_dapo.py",
            "gsm8k": "verl/verl/utils/reward_score/gsm8k_add_special_token_reward.py"}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official math_dapo and gsm8k_add_special_token_reward modules (PARALLEL_R1_GIT_DIR: the git
    dir of a clone of zhengkid/Parallel-R1); skip when it or git is absent."""
    modules, folder = {}, tmp_path_factory.mktemp("official")
    for name, path in OFFICIAL.items():
        try:
            source = subprocess.run(["git", f"--git-dir={OFFICIAL_GIT}", "show", f"HEAD:{path}"],
                                    capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            pytest.skip(f"no git copy of the official release at {OFFICIAL_GIT} (PARALLEL_R1_GIT_DIR)")
        file = folder / f"official_{name}.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location(file.stem, file)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return SimpleNamespace(**modules)


NUMBERS = ["42", "7", "-7", "1080", "0.75", "12"]
FORMS = ["{n}", "{n}.", "${n}$", "\\boxed{{{n}}}", "$\\boxed{{{n}}}$", "{n} dollars", "{n} apples", "x = {n}",
         "\\text{{{n}}}", "{n}^\\circ", "**{n}**", "\\${n}", "{n}.0", "\\frac{{{n}}}{{4}}",
         "{n} \\text{{ cm}}", "a {n}", "1,{n}", "{n}, 3", "{n}\\%", "\\sqrt{n}", "{n} \\text{{and}} 5"]
LEADS = ["Final Answer: ", "Final Answer:", "final answer: ", "FINAL ANSWER : ", "**Final Answer:** ",
         "**Final Answer**: ", "Final  Answer: ", "Final Answer:\n", "The answer is ", "Final answer:\n\n"]
GOLDS = ["{n}", "{n}", "{n}", "{n}.0", "${n}$", "\\frac{{{n}}}{{4}}", "\\sqrt{{{n}}}", "1,{n}", "x={n}"]


def random_response(rng, block_rate=0.4):
    """(response with tags, gold): answer lines in the main text, paths and summaries, amid filler."""
    n = rng.choice(NUMBERS)
    answer = lambda: rng.choice(LEADS) + rng.choice(FORMS).format(n=rng.choice([n, n, rng.choice(NUMBERS)]))
    filler = lambda: "".join(rng.choice("ab cd 0123456789.,=$\\{}\n")
                             for _ in range(rng.choice([0, 5, 40, 120, 260])))
    piece = lambda: rng.choice([filler(), answer() + rng.choice(["", "\n", " "]), filler() + "\n" + answer()])
    parts = []
    for _ in range(rng.randint(1, 4)):
        parts.append(piece())
        if rng.random() < block_rate:  # a block: 1 path (malformed), 2 or 3 paths, each a piece
            paths = "".join(PATH + piece() + PATH_END for _ in range(rng.choice([1, 2, 2, 3])))
            parts.append(PARALLEL + paths + PARALLEL_END + "\n" + SUMMARY + piece() + SUMMARY_END)
    return "".join(parts), rng.choice(GOLDS).format(n=n)


def test_paper_graders_match_the_official_functions(official):
    """4,000 generated responses: the same verdict and the same answer as the official functions."""
    rng, verdicts = random.Random(0), []
    for _ in range(4000):
        text, gold = random_response(rng)
        response = plain(text)
        by_dapo = official.dapo.compute_score(response, gold)
        gsm8k_answer = official.gsm8k.extract_solution(response)
        assert rewards.dapo(response, gold) is by_dapo["acc"], (text, gold)
        assert rewards.dapo_answer(response) == (None if by_dapo["pred"] == "[INVALID]" else by_dapo["pred"])
        assert rewards.gsm8k(response, gold) is (gsm8k_answer == gold), (text, gold)
        assert rewards.gsm8k_answer(response) == gsm8k_answer, (text, gold)
        verdicts.append((by_dapo["acc"], gsm8k_answer == gold))
    # the set has teeth: many correct by each, and the two graders disagree both ways
    print(f"\n{sum(d for d, _ in verdicts)} correct by dapo, {sum(g for _, g in verdicts)} by gsm8k, "
          f"{sum(d != g for d, g in verdicts)} disagree")
    assert sum(d for d, _ in verdicts) > 400 and sum(g for _, g in verdicts) > 250
    assert sum(d and not g for d, g in verdicts) > 100 and sum(g and not d for d, g in verdicts) > 100


PIECES = ["1", "42", ",", "000", ".", "-", "=", " ", "\n", "$", "\\$", "{", "}", "\\text{", "\\textbf{",
          "\\boxed{", "\\overline{", "\\frac", "\\sqrt", "x", "a ", "an ", "cm", "units", "\\text{m}",
          "^\\circ", "\\!", "mbox", "\\text{and}", "\\ ", "\\;", '"', "s"]


def test_minerva_normalise_matches_the_official_one(official):
    """5,000 strings of LaTeX pieces, newlines included (a gold may hold some): the same normal form."""
    rng = random.Random(2)
    for _ in range(5000):
        s = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 16)))
        assert rewards.minerva_normalise(s) == official.dapo.normalize_final_answer(s), s


def test_easy_reward_matches_the_official_one(official, bpe_tokenizer):
    """1,000 generated rollouts (tag tokens): `parallel` with the gsm8k grader pays +1 exactly where the
    official easy reward (correct AND a well-formed block, judged on the text with tags) pays 1."""
    rng, paid = random.Random(1), 0
    for _ in range(1000):
        text, gold = random_response(rng, block_rate=0.8)
        ro = tokenized(bpe_tokenizer, text)
        ours = reward_rollout(ro, gold, "parallel", grader=rewards.gsm8k)[0]
        theirs = official.gsm8k.compute_score(ro.plain_text, ro.text, gold)
        assert (ours, theirs) in [(1.0, 1.0), (-1.0, 0)], text
        paid += ours == 1.0
    print(f"\n{paid} of 1000 paid")
    assert paid > 40


# -----------------------------------------------------------------------------
# rewards and schedules


# (schedule, step, correct, has_block, reward)
REWARD_CASES = [
    ("accuracy", 1, True, False, 1.0), ("accuracy", 1, True, True, 1.0), ("accuracy", 9, False, True, -1.0),
    ("parallel", 1, True, True, 1.0), ("parallel", 1, True, False, -1.0), ("parallel", 1, False, True, -1.0),
    ("parallel", 1, False, False, -1.0),
    ("tiered", 1, True, True, 1.2), ("tiered", 1, True, False, 1.0), ("tiered", 1, False, True, -1.0),
    ("alternating", 1, True, True, 1.0), ("alternating", 8, True, True, 1.0), ("alternating", 9, True, True, 1.2),
    ("alternating", 10, True, True, 1.2), ("alternating", 10, True, False, 1.0),
    ("alternating", 10, False, True, -1.0), ("alternating", 11, True, True, 1.0),
    ("alternating", 19, True, True, 1.2), ("alternating", 20, True, True, 1.2), ("alternating", 21, True, True, 1.0),
    ("scaffold", 9, True, True, 1.2), ("scaffold", 199, True, True, 1.2), ("scaffold", 200, True, True, 1.2),
    ("scaffold", 201, True, True, 1.0), ("scaffold", 209, True, True, 1.0), ("scaffold", 210, True, True, 1.0),
    ("scaffold", 208, True, True, 1.0), ("scaffold", 300, False, True, -1.0),
]


@pytest.mark.parametrize("schedule,step,correct,has_block,reward", REWARD_CASES)
def test_reward_schedules(schedule, step, correct, has_block, reward):
    assert reward_fn(schedule, step)(correct, has_block) == reward


def test_alternating_window():
    tiered = [s for s in range(1, 101) if is_tiered_step(s)]
    assert tiered == [s for w in range(0, 100, 10) for s in (w + 9, w + 10)]
    assert len(tiered) == 20  # 8 + 2 in every window of 10


def test_scaffold_switch_step_is_configurable():
    assert reward_fn("scaffold", 59, scaffold_until=60).__name__ == "tiered_reward"
    assert reward_fn("scaffold", 69, scaffold_until=60).__name__ == "r_acc"


# -----------------------------------------------------------------------------
# rollouts: the structure comes from the tag tokens, never from the decoded text

Tag = namedtuple("Tag", "text")  # a real tag token; a plain-string piece is text (tags in it are spelled)
PAR, PAR_END, P, P_END, SUM, SUM_END = (Tag(t) for t in (PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END))


def real_block(p1="a", p2="b", s="s"):
    return [PAR, P, p1, P_END, P, p2, P_END, PAR_END, SUM, s, SUM_END]


def rollout(tokenizer, pieces):
    """A rollout (ending in EOS) from pieces: a Tag is its tag token, a string its ordinary sub-word tokens."""
    tags, ids = tag_ids(tokenizer), []
    for piece in pieces:
        if isinstance(piece, Tag):
            ids.append(tags[piece.text])
        else:
            spelled = tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            assert not set(spelled) & set(tags.values()), piece  # really spelled: no tag token in it
            ids += spelled
    return make_rollout(tokenizer, tokenizer("Q:")["input_ids"], ids + [tokenizer.eos_token_id], "eos")


CHECK = ["Let me check.", *real_block("3*7=21", "4*7=28", "both fine"), "So\nFinal Answer: 42"]  # a real block
SPELLED = ["Let me check." + block("3*7=21", "4*7=28", "both fine") + "So\nFinal Answer: 42"]  # same text, no tags

# (pieces, gold, schedule, (reward, has_block, format_ok, num_blocks, correct))
ROLLOUT_CASES = {
    # a real block
    "real": (CHECK, "42", "parallel", (1.0, True, True, 1, True)),
    "real-tiered": (CHECK, "42", "tiered", (1.2, True, True, 1, True)),
    "real-wrong": (CHECK, "41", "parallel", (-1.0, True, True, 1, False)),
    "real-two-blocks": (CHECK[:-1] + real_block() + CHECK[-1:], "42", "tiered", (1.2, True, True, 2, True)),
    "no-block": (["Final Answer: 42"], "42", "parallel", (-1.0, False, True, 0, True)),
    # the same block spelled with sub-word pieces: no block, no parallel reward; the answer still counts
    "spelled-parallel": (SPELLED, "42", "parallel", (-1.0, False, True, 0, True)),
    "spelled-tiered": (SPELLED, "42", "tiered", (1.0, False, True, 0, True)),
    "spelled-acc": (SPELLED, "42", "accuracy", (1.0, False, True, 0, True)),
    # spelled tags after a real block neither break it nor hide the answer
    "real+spelled-path-end": (CHECK[:-1] + ["So</Path> done\nFinal Answer: 42"], "42", "parallel",
                              (1.0, True, True, 1, True)),
    "real+spelled-parallel": (CHECK[:-1] + ["So <Parallel><Path>hmm</Path>\nFinal Answer: 42"], "42", "parallel",
                              (1.0, True, True, 1, True)),
    "real+spelled-block": (CHECK[:-1] + [block() + "Final Answer: 42"], "42", "tiered", (1.2, True, True, 1, True)),
    # a spelled summary or unclosed spelled block is main text: a Final Answer in it counts
    "spelled-summary": (["So <Summary>Final Answer: 42</Summary>"], "42", "accuracy", (1.0, False, True, 0, True)),
    "real+spelled-summary": (CHECK[:-1] + ["<Summary>\nFinal Answer: 42\n</Summary>"], "42", "parallel",
                             (1.0, True, True, 1, True)),
    "spelled-unclosed": (["x<Parallel><Path>\nFinal Answer: 42"], "42", "accuracy", (1.0, False, True, 0, True)),
    # a Final Answer only inside a real path or summary does not count
    "answer-in-path": (["x", *real_block(p1="Final Answer: 42"), "so"], "42", "accuracy", (-1.0, True, True, 1, False)),
    "answer-in-summary": (["x", *real_block(s="Final Answer: 42"), "so"], "42", "parallel",
                          (-1.0, True, True, 1, False)),
    "answer-in-path-wrong-main": (["x", *real_block(p2="Final Answer: 42"), "Final Answer: 41"], "42", "tiered",
                                  (-1.0, True, True, 1, False)),
    # malformed real tags: no block (the answer outside them still counts)
    "one-path": ([PAR, P, "a", P_END, PAR_END, SUM, "s", SUM_END, "Final Answer: 42"], "42", "parallel",
                 (-1.0, False, False, 0, True)),
    "one-path-acc": ([PAR, P, "a", P_END, PAR_END, SUM, "s", SUM_END, "Final Answer: 42"], "42", "accuracy",
                     (1.0, False, False, 0, True)),
    "unclosed-block": (["Final Answer: 42", PAR, P, "a", P_END, P, "b"], "42", "tiered", (1.0, False, False, 0, True)),
    "unclosed-hides-answer": (["x", PAR, P, "a", P_END, P, "Final Answer: 42"], "42", "accuracy",
                              (-1.0, False, False, 0, False)),
    "real-stray-path-end": (CHECK[:-1] + [P_END, "Final Answer: 42"], "42", "tiered", (1.0, False, False, 0, True)),
    "real-no-summary": (["x", PAR, P, "a", P_END, P, "b", P_END, PAR_END, "Final Answer: 42"], "42", "parallel",
                        (-1.0, False, False, 0, True)),
    "text-between-paths": (["x", PAR, P, "a", P_END, "\n", P, "b", P_END, PAR_END, SUM, "s", SUM_END,
                            "Final Answer: 42"], "42", "parallel", (-1.0, False, False, 0, True)),
    "good-then-one-path": (CHECK[:-1] + [PAR, P, "c", P_END, PAR_END, SUM, "s", SUM_END, "Final Answer: 42"], "42",
                           "tiered", (1.0, False, False, 0, True)),
    "empty": ([], "42", "accuracy", (-1.0, False, True, 0, False)),
}


@pytest.mark.parametrize("pieces,gold,schedule,expected", ROLLOUT_CASES.values(), ids=ROLLOUT_CASES.keys())
def test_reward_rollout(bpe_tokenizer, pieces, gold, schedule, expected):
    r, m = reward_rollout(rollout(bpe_tokenizer, pieces), gold, schedule)
    assert (r, m["has_block"], m["format_ok"], m["num_blocks"], m["correct"]) == expected
    assert m["reward"] == r and m["has_answer"] == (m["answer"] is not None)
    assert set(m) == {"reward", "correct", "answer", "has_answer", "format_ok", "has_block", "num_blocks", "reward_fn"}


def test_spelled_block_decodes_like_a_real_one_but_earns_nothing(bpe_tokenizer):
    real, spelled = rollout(bpe_tokenizer, CHECK), rollout(bpe_tokenizer, SPELLED)
    assert real.text == spelled.text and real.ids != spelled.ids  # the text cannot tell them apart
    again = [tokenized(bpe_tokenizer, r.text) for r in (real, spelled)]  # judged from their text...
    assert all(r.blocks and r.format_error is None for r in again)  # ...both would have a block
    assert reward_rollout(real, "42", "parallel")[0] == 1.0
    assert reward_rollout(spelled, "42", "parallel")[0] == -1.0
    assert real.main_text == "Let me check.So\nFinal Answer: 42" and spelled.main_text == spelled.text


def test_reward_rollout_schedule_and_step(bpe_tokenizer):
    good = rollout(bpe_tokenizer, CHECK)
    assert reward_rollout(good, "42", "alternating", step=9)[0] == 1.2
    assert reward_rollout(good, "42", "alternating", step=8)[0] == 1.0
    assert reward_rollout(good, "42", "scaffold", step=10, scaffold_until=5)[0] == 1.0
    assert [reward_rollout(good, "42", name)[1]["reward_fn"] for name in SCHEDULES] == \
        ["r_acc", "parallel_reward", "tiered_reward", "r_acc", "r_acc"]
    with pytest.raises(ValueError, match="unknown reward schedule"):
        reward_rollout(good, "42", "acc")  # the old name: refused with the list of names

# -----------------------------------------------------------------------------
# your own reward and grader: "module:function" (tests/custom_rewards.py)

CUSTOM = Path(__file__).with_name("custom_rewards.py")
KEYS = {"reward", "correct", "answer", "has_answer", "format_ok", "has_block", "num_blocks",
        "reward_fn"}


def test_resolve_builtins():
    assert [resolve(name, "reward") for name in SCHEDULES] == list(SCHEDULES)
    assert resolve("is_equiv", "grader") is is_equiv
    assert resolve("dapo", "grader") is rewards.dapo and resolve("gsm8k", "grader") is rewards.gsm8k


def test_resolve_module_and_file(monkeypatch):
    assert resolve("custom_rewards:length_penalty", "reward") is custom_rewards.length_penalty
    assert resolve("nanopr1.rewards:is_equiv", "grader") is is_equiv  # a module of a package
    grader = resolve(f"{CUSTOM}:exact_match", "grader")  # a file, by its path
    assert grader.__name__ == "exact_match" and grader("42", "42") and not grader("42 apples", "42")
    monkeypatch.chdir(CUSTOM.parents[1])  # a relative path, as on a command line
    assert resolve("tests/custom_rewards.py:length_penalty", "reward").__name__ == "length_penalty"


@pytest.mark.parametrize("spec,kind,message", [
    ("acc", "reward", "unknown reward 'acc': use one of accuracy, parallel, tiered, alternating, "
                      "scaffold or module:function"),
    ("math_verify", "grader", "unknown grader 'math_verify': use one of is_equiv, dapo, gsm8k or "
                              "module:function"),
    ("no_such_module:f", "reward", "reward no_such_module:f: no module named 'no_such_module'"),
    ("nanopr1.no_such:f", "grader", "grader nanopr1.no_such:f: no module named 'nanopr1.no_such'"),
    ("custom_rewards:nope", "reward", "reward custom_rewards:nope: 'nope' is not found in "
                                      "custom_rewards"),
    ("custom_rewards:PENALTY_PER_1000", "reward", "'PENALTY_PER_1000' is not callable in custom_"),
    ("no/such/file.py:f", "grader", "grader no/such/file.py:f: no file no/such/file.py"),
    (f"{CUSTOM}:nope", "grader", "'nope' is not found in"),
], ids=["unknown-reward", "unknown-grader", "no-module", "no-submodule", "no-function",
        "not-callable", "no-file", "file-no-function"])
def test_resolve_errors_are_one_line(spec, kind, message):
    with pytest.raises(UsageError) as e:
        resolve(spec, kind)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resolve_keeps_the_traceback_of_a_broken_module(tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency") as e:  # a bug: traceback
        resolve("broken_reward:anything", "reward")
    assert not isinstance(e.value, UsageError)


def test_reward_rollout_custom_reward(bpe_tokenizer):
    good = rollout(bpe_tokenizer, CHECK)
    seen = []

    def spy(ro, gold, step, info):
        seen.append((ro, gold, step, info))
        info["correct"] = "changed"  # a copy: the metrics keep the grader's verdict
        return 1

    r, m = reward_rollout(good, "42", spy, step=7)
    assert r == 1.0 and isinstance(r, float) and m["reward"] == 1.0 and m["reward_fn"] == "spy"
    info = dict(answer="42", correct="changed", has_block=True, format_ok=True, num_blocks=1)
    assert seen == [(good, "42", 7, info)] and m["correct"] is True and set(m) == KEYS
    penalty = resolve(f"{CUSTOM}:length_penalty", "reward")
    for gold, acc in [("42", 1.0), ("41", -1.0)]:
        r, m = reward_rollout(good, gold, penalty, step=300, scaffold_until=5)
        assert r == pytest.approx(acc - 0.1 * len(good.ids) / 1000) and r != acc
        assert m["reward_fn"] == "length_penalty" and m["correct"] == (acc > 0) and set(m) == KEYS
    assert reward_fn(penalty, 9) is penalty  # a custom reward is its own schedule, at every step
    assert reward_rollout(good, "42", functools.partial(spy))[1]["reward_fn"] == "partial"


def test_reward_rollout_custom_grader(bpe_tokenizer):
    """The grader's verdict is info["correct"]: it reaches the metrics and any reward."""
    good, answerless = rollout(bpe_tokenizer, CHECK), rollout(bpe_tokenizer, ["no answer"])
    exact = resolve("custom_rewards:exact_match", "grader")
    assert reward_rollout(good, "42.0", "parallel")[0] == 1.0  # is_equiv: 42 == 42.0
    r, m = reward_rollout(good, "42.0", "parallel", grader=exact)
    assert (r, m["correct"], m["answer"], m["reward_fn"]) == (-1.0, False, "42", "parallel_reward")
    assert reward_rollout(good, "42", "tiered", grader=exact)[0] == 1.2
    always = lambda answer, gold: answer is None  # noqa: E731 (sees None when there is no answer)
    assert reward_rollout(answerless, "42", "accuracy", grader=always)[1]["correct"] is True
    r, m = reward_rollout(good, "42.0", custom_rewards.length_penalty, grader=exact)
    assert r < -1.0 and not m["correct"] and m["reward_fn"] == "length_penalty"


def test_custom_response_grader(bpe_tokenizer):
    """A grader marked reads = "response" gets the whole response, tags gone; its extract is the answer."""
    grader = resolve(f"{CUSTOM}:last_boxed_anywhere", "grader")
    ro = rollout(bpe_tokenizer, ["x", *real_block(p1="so \\boxed{42}"), "Final Answer: 41"])
    assert reward_rollout(ro, "41")[1]["correct"] is True  # is_equiv: the main line's 41
    r, m = reward_rollout(ro, "42", "parallel", grader=grader)
    assert (r, m["correct"], m["answer"]) == (1.0, True, "42")
    seen = []
    spy = lambda response, gold: seen.append(response) or False  # noqa: E731
    spy.reads = "response"
    assert rewards.grade(ro, "42", spy) == (False, "41")  # no extract: the main line's answer
    assert seen == ["xso \\boxed{42}bsFinal Answer: 41"]


def says_no(answer, gold):
    return "no"


def broken_grader(answer, gold):
    raise ValueError("no gold\nsecond line")


def nan_reward(rollout, gold, step, info):
    return float("nan")


# (grader's verdict, its error message or None when it is a verdict)
VERDICTS = [(True, None), (False, None), (np.bool_(True), None), (np.bool_(False), None),
            (torch.tensor(True), None), ("no", "returned 'no': a grader returns True or False"),
            (None, "returned None"), (1, "returned 1"),
            (0.0, "returned 0.0"), (torch.tensor([True, False]), "returned tensor([ True, False])"),
            (np.array([[True], [False]]), "returned array([[ True], [False]])")]


@pytest.mark.parametrize("verdict,message", VERDICTS, ids=[f"{i}" for i in range(len(VERDICTS))])
def test_grader_verdict_is_a_bool_or_a_one_line_error(bpe_tokenizer, verdict, message):
    ro = rollout(bpe_tokenizer, CHECK)
    grader = lambda answer, gold: verdict  # noqa: E731
    if message is None:
        assert reward_rollout(ro, "42", grader=grader)[1]["correct"] is bool(verdict)
        return
    with pytest.raises(UsageError) as e:
        reward_rollout(ro, "42", grader=grader)
    assert str(e.value).startswith("grader test_rewards:test_grader_verdict_is_a_bool_or_a_one_line_error.")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_grader_errors_name_the_grader(bpe_tokenizer, tmp_path):
    ro = rollout(bpe_tokenizer, CHECK)
    with pytest.raises(UsageError, match=r"^grader test_rewards:says_no returned 'no': a grader returns"):
        reward_rollout(ro, "42", grader=says_no)
    with pytest.raises(UsageError) as e:  # a grader that raises: its first line, the traceback chained
        reward_rollout(ro, "42", grader=broken_grader)
    assert str(e.value) == "grader test_rewards:broken_grader raised ValueError: no gold"
    assert isinstance(e.value.__cause__, ValueError)
    (tmp_path / "my_grader.py").write_text("def yes(answer, gold):\n    return 'yes'\n")
    with pytest.raises(UsageError, match=r"^grader my_grader:yes returned 'yes'"):  # from a file
        reward_rollout(ro, "42", grader=resolve(f"{tmp_path}/my_grader.py:yes", "grader"))


# (reward's value, its error message or None when it is a reward)
REWARD_VALUES = [(1, None), (0.5, None), (np.float32(0.5), None), (torch.tensor(0.5), None), (True, None),
                 (float("nan"), "returned nan: a reward is a finite number"), (float("inf"), "returned inf"),
                 (-float("inf"), "returned -inf"), (None, "returned None"), ("1.0", "returned '1.0'"),
                 ([1.0], "returned [1.0]"), (np.float64("nan"), "returned np.float64(nan)"),
                 (torch.tensor([1.0, 2.0]), "returned tensor([1., 2.])"), ("x" * 200, "returned 'xxx")]


@pytest.mark.parametrize("value,message", REWARD_VALUES, ids=[f"{i}" for i in range(len(REWARD_VALUES))])
def test_custom_reward_is_finite_or_a_one_line_error(bpe_tokenizer, value, message):
    ro = rollout(bpe_tokenizer, CHECK)
    reward = lambda rollout, gold, step, info: value  # noqa: E731
    if message is None:
        assert reward_rollout(ro, "42", reward)[0] == float(value)
        return
    with pytest.raises(UsageError) as e:
        reward_rollout(ro, "42", reward)
    assert str(e.value).startswith("reward test_rewards:test_custom_reward_is_finite_or_a_one_line_error.")
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 250


def test_nan_reward_names_its_function(bpe_tokenizer):
    with pytest.raises(UsageError, match=r"^reward test_rewards:nan_reward returned nan: a reward is a"):
        reward_rollout(rollout(bpe_tokenizer, CHECK), "42", nan_reward)


@pytest.mark.parametrize("hidden", [False, True])
def test_math_verify_grader_is_optional(monkeypatch, hidden):
    """math-verify if it is installed, else is_equiv; hidden: as if it were not installed."""
    if hidden:
        monkeypatch.setitem(sys.modules, "math_verify", None)  # its import raises ImportError
    grader = resolve("custom_rewards:math_verify_grader", "grader")
    cases = [("42", "42", True), ("41", "42", False), (None, "42", False),
             ("\\frac{3}{4}", "0.75", True), ("\\boxed{1,080}", "1080", True)]
    assert [bool(grader(answer, gold)) for answer, gold, _ in cases] == [c for _, _, c in cases]


# -----------------------------------------------------------------------------
# real data


def test_teacher_traces_grade_correct(bpe_tokenizer):
    """The 341 real teacher traces, tokenized (the tags are special tokens): every final answer that
    exists grades correct against `answer`; the corpus filter (data.judge_trace) keeps the traces with
    well-formed tag tokens, a block and a correct answer."""
    rows = [json.loads(line) for line in shared_file("parallel_gsm8k_sample.jsonl").read_text().split("\n") if line]
    results = [reward_rollout(tokenized(bpe_tokenizer, normalize(r["response"])), r["answer"])[1] for r in rows]
    correct = sum(m["correct"] for m in results)
    print(f"\n{correct} of {len(rows)} teacher traces grade correct; "
          f"{sum(m['has_block'] for m in results)} have a valid block")
    assert len(rows) == 341
    assert all(m["correct"] for m in results if m["has_answer"])
    # measured: 340; the one other trace writes its answer inside an unclosed summary
    assert correct == 340
    assert sum(not m["has_answer"] for m in results) == 1
    # (339, 336) since text between </Parallel> and <Summary> is read as the block's gap (attention.py)
    assert (sum(m["format_ok"] for m in results), sum(m["has_block"] for m in results)) == (339, 336)
    kept = [data.judge_trace(r["response"], r["answer"], bpe_tokenizer)[1] is None for r in rows]
    assert kept == [m["format_ok"] and m["has_block"] and m["correct"] for m in results] and sum(kept) == 336
    # the paper's graders read the whole response: all 341 (the unclosed summary's answer too)
    rollouts = [tokenized(bpe_tokenizer, normalize(r["response"])) for r in rows]
    for grader in (rewards.dapo, rewards.gsm8k):
        assert all(rewards.grade(ro, r["answer"], grader)[0] for ro, r in zip(rollouts, rows))
