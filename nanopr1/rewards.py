"""Grading a rollout.Rollout and turning the grade into a reward: 1) extraction, 2) normalisation
(is_equiv), 3) the paper's graders (dapo, gsm8k), 4) grade and the rewards and their schedules, 5) your
own by "module:function" (`resolve`). The rules: docs/design.md, "Grading and rewards".

A grader is one of two kinds. An answer grader, grader(answer, gold) -> bool, gets the extracted answer
of the main-line text (None if it has none): is_equiv, and yours by default. A response grader, marked
by the attribute `reads = "response"`, gets the whole response decoded without special tokens
(Rollout.plain_text: paths and summaries kept, tags gone) and finds the answer itself: dapo, gsm8k. Its
optional attribute `extract(response) -> answer` names what it compared, for the logs. Both return a
bool; anything else, or an exception, is a one-line UsageError naming the grader.
"""

import importlib.util
import math
import numbers
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
    # from the opening brace, count the depth to the brace that closes it
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
    # unicode minus signs as ASCII; then LaTeX wrappers, fractions and units as plain text
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
    # a numeric gold compares by value (0.75 == 3/4), any other as a cleaned string without spaces
    g = parse_number(gold)
    if g is not None:
        return parse_number(pred) == g
    squash = lambda s: re.sub(r"\s+", "", s).lower()
    return pred != "" and squash(pred) == squash(gold)


# 3) the paper's graders: the whole response (paths and summaries too), a string comparison

# the hard stage and the benchmarks (verl's math_dapo): the last `Final Answer:` line of the response's
# last 300 characters, in any case, and the gold, both in the Minerva normal form, are the same string
DAPO_WINDOW = 300
_DAPO_ANSWER_RE = re.compile(r"final answer\s*:\s*([^\n]+)", re.IGNORECASE)
_MINERVA_REPLACE = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
                    ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
# units and filler dropped, in this order (`\text{}` once the unit inside it is gone)
_MINERVA_DROP = ("square ways integers dollars mph inches hours km units \\ldots sue points feet minutes "
                 "digits cents degrees cm gm pounds meters meals edges students childrentickets multiples "
                 "\\text{s} \\text{.} \\text{\ns} \\text{}^2 \\text{}^3 \\text{\n} \\text{} \\mathrm{th} "
                 "^\\circ ^{\\circ} \\; ,\\! {,} \" \\dots").split(" ")
# applied in turn, each within one line: a line with two $ keeps what the first two enclose; \text{..},
# \textbf{..}, \overline{..} unwrapped (to the first }), \boxed{..} (to the last); \frac12 -> \frac{1}{2}
_MINERVA_SUBS = [(re.compile(pattern), repl) for pattern, repl in [
    (r"[^\n]*?\$([^\n]*?)\$[^\n]*", r"$\1$"), (r"\\text\{([^\n]*?)\}", r"\1"),
    (r"\\textbf\{([^\n]*?)\}", r"\1"), (r"\\overline\{([^\n]*?)\}", r"\1"), (r"\\boxed\{([^\n]*)\}", r"\1"),
    (r"frac([^{])(.)", r"frac{\1}{\2}"), (r"sqrt([^{])", r"sqrt{\1}")]]
# the easy stage (verl's gsm8k_add_special_token_reward): the first `Final Answer: <number>`, case-sensitive,
# ASCII digits only
_GSM8K_ANSWER_RE = re.compile(r"Final Answer:\s*(-?[0-9.,]+)")


def minerva_normalise(s):
    """An answer in the Minerva normal form: what follows its last `=`, without spaces, units, \\text
    or $; 1,000 as 1000."""
    # what follows the last `=`, then the fixed replacements and removals, in their order
    s = s.split("=")[-1]
    for old, new in _MINERVA_REPLACE:
        s = s.replace(old, new)
    for unit in _MINERVA_DROP:
        s = s.replace(unit, "")
    # the LaTeX rewrites, each within a line, in their order
    for pattern, repl in _MINERVA_SUBS:
        s = pattern.sub(repl, s)
    s = s.replace("$", "")
    # digits and commas only: a number with its thousands separators dropped (1,080 -> 1080)
    return (s.replace(",", "") if s.replace(",", "").isdigit() else s).strip()


def dapo_answer(response):
    """What the dapo grader compares: the normalised last answer line near the end, or None."""
    # only the end of the response is read: an answer written earlier counts for nothing
    hits = _DAPO_ANSWER_RE.findall(response[-DAPO_WINDOW:])
    return minerva_normalise(hits[-1]) if hits else None


def dapo(response, gold):
    """The paper's hard-stage and benchmark grader (verl's math_dapo.compute_score), as strict as it:
    `Final Answer: 42.`, `**Final Answer:** 42`, a bare \\boxed{42} or 0.75 for \\frac{3}{4} are wrong."""
    # both sides in the same normal form, then plain string equality
    answer = dapo_answer(response)
    return answer is not None and answer == minerva_normalise(str(gold))


def gsm8k_answer(response):
    """What the gsm8k grader compares: the first `Final Answer: <number>`, commas dropped, or None."""
    # the first match wins: a later correction counts for nothing
    m = _GSM8K_ANSWER_RE.search(response)
    return m.group(1).replace(",", "") if m else None


def gsm8k(response, gold):
    """The paper's easy-stage grader, its correctness part (the block is the reward `parallel`'s):
    the first answer is the gold string (`42.`, `42.0` and `final answer: 42` are wrong)."""
    answer = gsm8k_answer(response)
    return answer is not None and answer == str(gold)


# both read the whole response (grade passes them Rollout.plain_text); `extract` is what they compared
dapo.reads = gsm8k.reads = "response"
dapo.extract, gsm8k.extract = dapo_answer, gsm8k_answer
GRADERS = {"is_equiv": is_equiv, "dapo": dapo, "gsm8k": gsm8k}


# 4) grading a rollout, rewards and schedules
def grade(rollout, gold, grader=None):
    """(correct, answer) of a rollout.Rollout by `grader` (None: is_equiv); `answer` is what the grader
    compared if it says (`extract`), else the main line's answer. No gold (None): never correct."""
    grader = grader or is_equiv
    answer = extract_answer(rollout.main_text)
    # a response grader reads the whole response, an answer grader the main line's answer
    reads_response = getattr(grader, "reads", None) == "response"
    seen = rollout.plain_text if reads_response else answer
    if reads_response and hasattr(grader, "extract"):
        answer = grader.extract(seen)
    # no gold (sample.py): the answer is read, nothing is judged
    if gold is None:
        return False, answer
    return _verdict(grader, seen, gold), answer


SCHEDULES = ("accuracy", "parallel", "tiered", "alternating", "scaffold")


def r_acc(correct, has_block=False):
    """R_acc: +1 correct, -1 otherwise."""
    return 1.0 if correct else -1.0


def parallel_reward(correct, has_block):
    """Easy-stage reward (Seen recipe): +1 only if correct AND a valid parallel block. The official
    one pays 1 / 0: GRPO's group standardisation gives both the same advantages (to its 1e-6 epsilon)."""
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
        raise ValueError(f"unknown reward schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    # the exploration scaffold: S2 (alternating) until the switch step, then accuracy alone
    if schedule == "scaffold":
        schedule = "alternating" if step <= scaffold_until else "accuracy"
    if schedule == "alternating":
        return tiered_reward if is_tiered_step(step) else r_acc
    return {"accuracy": r_acc, "parallel": parallel_reward, "tiered": tiered_reward}[schedule]


def reward_rollout(rollout, gold, schedule="accuracy", step=1, scaffold_until=200, grader=None):
    """(reward, metrics) of a rollout.Rollout at RL step `step` (from 1); grader None: is_equiv."""
    # grade: the answer by the grader; the blocks of the tag tokens (none if malformed)
    correct, answer = grade(rollout, gold, grader)
    format_ok = rollout.format_error is None
    blocks = rollout.blocks if format_ok else []
    info = {"answer": answer, "correct": correct, "format_ok": format_ok,
            "has_block": any(len(b.paths) >= 2 for b in blocks), "num_blocks": len(blocks)}
    # reward: a built-in one of (correct, has_block), or yours of the whole rollout
    fn = reward_fn(schedule, step, scaffold_until)
    if callable(schedule):
        reward = _finite(fn, fn(rollout, gold, step, dict(info)))  # a copy: the metrics keep the grade
    else:
        reward = float(fn(correct, info["has_block"]))
    name = getattr(fn, "__name__", type(fn).__name__)  # a functools.partial has no __name__
    return reward, {"reward": reward, **info, "has_answer": answer is not None, "reward_fn": name}


# 5) your own graders and rewards: found by "module:function", what they return checked (a one-line
# error names them)
def resolve(spec, kind):
    """The `kind` named by `spec`: a built-in, "module:function" or "path/to/file.py:function"."""
    builtin = {"reward": {s: s for s in SCHEDULES}, "grader": GRADERS}[kind]
    # a built-in by its name, else a function of a file or of an importable module
    where, _, name = spec.rpartition(":")
    if not where:
        if spec not in builtin:
            raise UsageError(f"unknown {kind} {spec!r}: use one of {', '.join(builtin)} or module:function")
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


def _name(fn):
    """A grader's or reward's name for a message: a built-in's own, else module:function."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    return name if getattr(fn, "__module__", None) == __name__ else f"{fn.__module__}:{name}"


def _short(value):
    """repr(value) on one line, at most 80 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _verdict(grader, seen, gold):
    """grader(seen, gold) as a bool, or a one-line error naming the grader."""
    try:
        verdict = grader(seen, gold)
    except Exception as e:  # a broken grader of the user's: one line, the traceback chained
        first = str(e).strip().split("\n")[0][:200]
        raise UsageError(f"grader {_name(grader)} raised {type(e).__name__}: {first}") from e
    # a bool, numpy's or a one-element torch bool: "no" or 0.0 is a bug, not a verdict
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if isinstance(verdict, bool) or (np is not None and isinstance(verdict, np.bool_)) or (
            torch is not None and isinstance(verdict, torch.Tensor) and verdict.dtype == torch.bool
            and verdict.numel() == 1):
        return bool(verdict)
    raise UsageError(f"grader {_name(grader)} returned {_short(verdict)}: a grader returns True or False")


def _finite(fn, value):
    """A reward's value as a float, or a one-line error naming the reward function."""
    # a Python or numpy real, or a one-element torch tensor; and then a finite one
    torch = sys.modules.get("torch")
    if isinstance(value, numbers.Real) or (torch is not None and isinstance(value, torch.Tensor)
                                           and value.numel() == 1 and not value.is_complex()):
        if math.isfinite(float(value)):
            return float(value)
    raise UsageError(f"reward {_name(fn)} returned {_short(value)}: a reward is a finite number")
