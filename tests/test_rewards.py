"""Tests for nanopr1/rewards.py: answer extraction and grading (table-driven, with
adversarial cases, each response tokenized into a rollout), the reward functions and
schedules, rollouts graded from their tag tokens (real tags vs the same tags spelled as
text), your own rewards and graders (module:function, tests/custom_rewards.py), and the
real teacher traces."""

import functools
import json
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

import custom_rewards
from conftest import shared_file
from nanopr1 import UsageError, data
from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, normalize
from nanopr1.model import tag_ids
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
    ("math_verify", "grader", "unknown grader 'math_verify': use one of is_equiv or module:"),
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
    assert (sum(m["format_ok"] for m in results), sum(m["has_block"] for m in results)) == (338, 335)
    kept = [data.judge_trace(r["response"], r["answer"], bpe_tokenizer)[1] is None for r in rows]
    assert kept == [m["format_ok"] and m["has_block"] and m["correct"] for m in results] and sum(kept) == 335
