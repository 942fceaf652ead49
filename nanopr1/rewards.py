"""Grading a rollout.Rollout's answer and turning the grade into a reward: 1) extraction, 2)
normalisation, 3) the rewards and their schedules, your own by "module:function" (`resolve`). The
rules: docs/design.md, "Grading and rewards"."""

import importlib.util
import re
import sys
from fractions import Fraction
from pathlib import Path

from nanopr1 import UsageError
from nanopr1.format import TAGS

# 1) extraction
# also **Final Answer**: 42 and **Final Answer:** 42 (the closing ** is eaten: not the answer)
_ANSWER_RE = re.compile(r"final\s+answer[\s*_]*:(?:\*\*|__)?", re.IGNORECASE)
_MARKUP_LINE_RE = re.compile(r"(?:\s|[*_`$]|\\[\[\]()])*")  # a line of markup only: **, $$, \[, ```


def last_boxed(text):
    """The contents of the last \\boxed{...} in `text` (braces balanced), or None."""
    k = text.rfind("\\boxed{")
    if k < 0:
        return None
    depth, start = 0, k + len("\\boxed{")
    for i in range(start - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None  # unclosed: a truncated response


def extract_answer(main):
    """The raw answer of a main-line text: what follows its last `Final Answer:`, else \\boxed{}."""
    hits = list(_ANSWER_RE.finditer(main))
    if not hits:
        return last_boxed(main) or None  # an empty \\boxed{} is no answer
    # `Final Answer:` alone on its line, or followed by markup only: the answer is on the next line
    lines = main[hits[-1].end():].split("\n")
    return next((line.strip() for line in lines if not _MARKUP_LINE_RE.fullmatch(line)), None)


# 2) normalisation and comparison
_UNWRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac(\d)(\d)")
_MIXED_RE = re.compile(r"(\d)\s*(?=\\[dt]?frac)")  # 2\frac{1}{2}: the mixed number 2 1/2, not 21/2
_DROP = ["\\\\", "\\$", "$", "\\(", "\\)", "\\[", "\\]", "\\left", "\\right", "\\!", "\\,", "\\;",
         "\\:", "\\ ", "^\\circ", "^{\\circ}", "\\circ", "°", "\\%", "%", "**", "`"]
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2012": "-", "\u2014": "-", "\uff0d": "-"})

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|[-+]?\.\d+"
# an optional whole part (the 2 of the mixed number 2 1/2), a number, an optional denominator
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:([-+]?\d+)\s+(?=\d+\s*/\s*[-+]?\d))?"
                        rf"({_NUMBER})(?:\s*/\s*({_NUMBER}))?")
# not before the number: digits or LaTeX (\sqrt{3}, x_2), an operator it is the operand of (x - 7)
_BEFORE_RE = re.compile(r"[\d\\{^_]|[-+*/×·<>≤≥]\s*$")
# not after it: more math (3x, 2^{10}, 5 - 3), a ratio or a time (2:3), candidates (6, 7; 6 or 7)
_AFTER_RE = re.compile(r"[A-Za-z](?![A-Za-z])|\s*[\^*/+\-×·\\√!_=<>≤≥]|\s*:\s*\d"
                       r"|\s*[,;]\s*[-+]?\.?\d|\s+(?:or|and)\s+[-+]?\.?\d", re.IGNORECASE)


def clean_answer(s):
    """An answer unwrapped (\\boxed, \\text, $, units, tags), \\frac as a/b, after its last `=`."""
    s = s.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.translate(_MINUS)
    for _ in range(3):  # nested \text{\textbf{..}}
        s = _UNWRAP_RE.sub(r"\1", s)
    s = _FRAC_SHORT_RE.sub(r"\1/\2", _FRAC_RE.sub(r"(\1)/(\2)", _MIXED_RE.sub(r"\1 ", s)))
    s = s.replace("{,}", ",")
    for d in _DROP:
        s = s.replace(d, "")
    for t in TAGS:  # a tag spelled in the main text is no answer: 42</Summary> (4<Path>2 != 42)
        s = s.replace(t, " ")
    s = s.split("=")[-1]  # "x = 42", "3 + 4 = 7"
    return s.strip().rstrip(".").strip()


def parse_number(s):
    """The value of a cleaned answer's leading number, or None if it is only part of the answer:
    `42 apples` -> 42; `(3)/(4)` -> 3/4; `-2 (1)/(2)` -> -5/2; `3x + 1`, `6 or 7` -> None."""
    s = re.sub(r"\(\s*([-+]?[\d.,]+)\s*\)", r"\1", s)  # (3)/(4) -> 3/4
    s = re.sub(r"^([-+])\s+(?=[\d.])", r"\1", s)  # a leading sign keeps its number: - 7 -> -7
    m = _NUMBER_RE.search(s)
    if m is None or _BEFORE_RE.search(s, 0, m.start()) or _AFTER_RE.match(s, m.end()):
        return None  # the number is only part of the answer
    whole, num, den = m.groups()
    try:  # the denominator of a plain number is 1
        value = Fraction(num.replace(",", "")) / Fraction((den or "1").replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    if whole is not None:  # 2 1/2 = 5/2, -2 1/2 = -5/2
        value = Fraction(whole) + (-value if whole.startswith("-") else value)
    return value


def is_equiv(pred, gold):
    """Does the answer string `pred` mean the gold answer `gold`?"""
    if pred is None:
        return False
    pred, gold = clean_answer(str(pred)), clean_answer(str(gold))
    g = parse_number(gold)
    if g is not None:
        return parse_number(pred) == g
    squash = lambda s: re.sub(r"\s+", "", s).lower()
    return pred != "" and squash(pred) == squash(gold)


# 3) rewards and schedules
SCHEDULES = ("accuracy", "parallel", "tiered", "alternating", "scaffold")


def r_acc(correct, has_block=False):
    """R_acc: +1 correct, -1 otherwise."""
    return 1.0 if correct else -1.0


def parallel_reward(correct, has_block):
    """Easy-stage reward (Seen recipe): +1 only if correct AND a valid parallel block."""
    return 1.0 if correct and has_block else -1.0


def tiered_reward(correct, has_block):
    """+1.2 correct with a valid block, +1.0 correct without, -1.0 otherwise."""
    return (1.2 if has_block else 1.0) if correct else -1.0


def is_tiered_step(step, window=10, tiered=2):
    """Is RL step `step` (from 1) one of the last `tiered` of its window (9, 10, 19, 20, ...)?"""
    return (step - 1) % window >= window - tiered


def reward_fn(schedule, step, scaffold_until=200):
    """The reward function of `schedule` at RL step `step` (from 1): S2 alternates R_acc, tiered."""
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown reward schedule {schedule!r}; "
                         f"choose one of {', '.join(SCHEDULES)}")
    if schedule == "scaffold":
        schedule = "alternating" if step <= scaffold_until else "accuracy"
    if schedule == "alternating":
        return tiered_reward if is_tiered_step(step) else r_acc
    return {"accuracy": r_acc, "parallel": parallel_reward, "tiered": tiered_reward}[schedule]


def reward_rollout(rollout, gold, schedule="accuracy", step=1, scaffold_until=200, grader=None):
    """(reward, metrics) of a rollout.Rollout at RL step `step` (from 1); grader None: is_equiv."""
    # grade: the answer of the main-line text; the blocks of the tag tokens (none if malformed)
    answer = extract_answer(rollout.main_text)
    format_ok = rollout.format_error is None
    blocks = rollout.blocks if format_ok else []
    correct = bool((grader or is_equiv)(answer, gold))
    info = {"answer": answer, "correct": correct, "format_ok": format_ok,
            "has_block": any(len(b.paths) >= 2 for b in blocks), "num_blocks": len(blocks)}
    # reward: a built-in one of (correct, has_block), or yours of the whole rollout
    fn = reward_fn(schedule, step, scaffold_until)
    if callable(schedule):
        reward = float(fn(rollout, gold, step, dict(info)))  # a copy: the metrics keep the grade
    else:
        reward = float(fn(correct, info["has_block"]))
    name = getattr(fn, "__name__", type(fn).__name__)  # a functools.partial has no __name__
    return reward, {"reward": reward, **info, "has_answer": answer is not None, "reward_fn": name}


def resolve(spec, kind):
    """The `kind` named by `spec`: a built-in, "module:function" or "path/to/file.py:function"."""
    builtin = {"reward": {s: s for s in SCHEDULES}, "grader": {"is_equiv": is_equiv}}[kind]
    where, _, name = spec.rpartition(":")
    if not where:
        if spec not in builtin:
            raise UsageError(f"unknown {kind} {spec!r}: use one of {', '.join(builtin)} "
                             "or module:function")
        return builtin[spec]
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise UsageError(f"{kind} {spec}: no file {where}")
        found = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(found)
        sys.modules.setdefault(found.name, module)  # for what needs it (dataclasses, pickle)
        found.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:  # a module the found one imports keeps its traceback
            if e.name is None or not (where + ".").startswith(e.name + "."):
                raise
            raise UsageError(f"{kind} {spec}: no module named {e.name!r}")
    fn = getattr(module, name, None)
    if not callable(fn):
        what = "not callable" if hasattr(module, name) else "not found"
        raise UsageError(f"{kind} {spec}: {name!r} is {what} in {where}")
    return fn
