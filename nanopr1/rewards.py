"""
Grading answers and turning grades into rewards.

0) Structure from tokens. A rollout's blocks, its format check and its main
   text (`Rollout.blocks`, `.format_error`, `.main_text`, made by
   rollout.make_rollout) are read from the six tag *token ids*, never from the
   decoded text. Why: a tag can also be spelled with ordinary sub-word pieces
   (`<`, `Parallel`, `>`), which decodes to exactly the text of the real tag
   token. Judged from text, a policy could earn the parallel reward with a
   spelled block the sampler never forked (a reward hack), and a real block
   followed by a spelled `</Path>` would count as malformed. From tokens, a
   spelled tag is plain main text: it neither makes nor breaks a block, and a
   `Final Answer:` after it still counts. `reward_rollout` grades a Rollout
   this way, for RL and for eval alike; `grade` grades a plain text (teacher
   traces), whose structure can only come from its text.
1) Extraction (`extract_answer`, the only extractor: the grader and every
   displayed answer use it). The answer is the rest of the line after the
   last `Final Answer:` of the main text (case-insensitive, as the official
   regex; markdown bold around it is allowed), or the next line when only
   markup (`**`, `$$`, `\\[`) follows it. One inside a path or a summary does
   not count: paths are scratch work, only the main line commits to an
   answer. With no `Final Answer:` we fall back to the main text's last
   `\\boxed{...}` (a base model's habit; not in the paper).
2) Normalisation. Models write `$1,080.`, `\\boxed{-\\frac{3}{4}}`,
   `x = 42 apples`, `\\(42\\)`, `−7` (unicode minus) ... for the gold `1080`,
   `-3/4`, `42`, `-7`. We strip the LaTeX and currency wrappers (and a tag
   spelled next to the answer: `42</Summary>`), keep what follows the last
   `=`, and read the leading number (with thousands separators, decimals, a
   simple fraction or a mixed number `2\\frac{1}{2}`); two numbers are equal
   if their values are (42.0 == 42, 0.75 == 3/4). A number that is only part
   of the answer is not read: glued to more math (`3x`, `2^{10}`, `5 - 3`,
   the ratio `2:3`, the time `10:30`), the operand of an operator before it
   (`x - 7`), or one of a list of candidates (`6, 7`, `6 or 7`: hedging earns
   nothing). Non-numeric answers fall back to comparing the cleaned strings
   (`2:3` equals the gold `2:3`).
3) Rewards, functions of (correct, has_block): R_acc ±1, the paper's
   easy-stage reward and its tiered reward; a schedule (`reward_fn`) picks
   one per RL step and `reward_rollout` grades a rollout and applies it.

Simplification: the grader is a small hand-written normaliser for integer and
simple numeric answers (what GSM8K, DAPO-Math, AIME, AMC and the MATH subset
use), not a symbolic checker like math-verify.
"""

import re
from fractions import Fraction

from nanopr1.format import TAGS, main_text

# -----------------------------------------------------------------------------
# 1) extraction

# also **Final Answer**: 42 and **Final Answer:** 42 (the closing ** is eaten, it is not part of the answer)
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
    """The raw answer string of a response's *main text* (see the module docstring), or None."""
    hits = list(_ANSWER_RE.finditer(main))
    if not hits:
        return last_boxed(main) or None  # an empty \\boxed{} is no answer
    # `Final Answer:` alone on its line, or followed by markup only: the answer is on the next line
    lines = main[hits[-1].end():].split("\n")
    return next((line.strip() for line in lines if not _MARKUP_LINE_RE.fullmatch(line)), None)

# -----------------------------------------------------------------------------
# 2) normalisation and comparison

_UNWRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac(\d)(\d)")
_MIXED_RE = re.compile(r"(\d)\s*(?=\\[dt]?frac)")  # 2\frac{1}{2}: the mixed number 2 1/2, not 21/2
_DROP = ["\\\\", "\\$", "$", "\\(", "\\)", "\\[", "\\]", "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ",
         "^\\circ", "^{\\circ}", "\\circ", "°", "\\%", "%", "**", "`"]
_MINUS = {"\u2212": "-", "\u2013": "-", "\u2012": "-", "\u2014": "-", "\uff0d": "-"}

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|[-+]?\.\d+"
# an optional whole part (the 2 of the mixed number 2 1/2), a number, an optional denominator
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:([-+]?\d+)\s+(?=\d+\s*/\s*[-+]?\d))?({_NUMBER})(?:\s*/\s*({_NUMBER}))?")
# what may not come before the number: digits or LaTeX (\sqrt{3}, x_2), an operator it is the operand of (x - 7)
_BEFORE_RE = re.compile(r"[\d\\{^_]|[-+*/×·<>≤≥]\s*$")
# what may not follow it: more math (3x, 2^{10}, 5 - 3), a ratio or a time (2:3, 10:30), more candidates (6, 7; 6 or 7)
_AFTER_RE = re.compile(r"[A-Za-z](?![A-Za-z])|\s*[\^*/+\-×·\\√!_=<>≤≥]|\s*:\s*\d|\s*[,;]\s*[-+]?\.?\d"
                       r"|\s+(?:or|and)\s+[-+]?\.?\d", re.IGNORECASE)


def clean_answer(s):
    """Strip wrappers and keep what follows the last `=` (see the module docstring)."""
    s = s.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    for a, b in _MINUS.items():
        s = s.replace(a, b)
    for _ in range(3):  # nested \text{\textbf{..}}
        s = _UNWRAP_RE.sub(r"\1", s)
    s = _FRAC_SHORT_RE.sub(r"\1/\2", _FRAC_RE.sub(r"(\1)/(\2)", _MIXED_RE.sub(r"\1 ", s)))
    s = s.replace("{,}", ",")
    for d in _DROP:
        s = s.replace(d, "")
    for t in TAGS:  # a tag spelled in the main text is no part of the answer: `42</Summary>` (`4<Path>2` is not 42)
        s = s.replace(t, " ")
    s = s.split("=")[-1]  # "x = 42", "3 + 4 = 7"
    return s.strip().rstrip(".").strip()


def parse_number(s):
    """The value of the leading number of a cleaned answer, or None.

    `42 apples` -> 42; `(3)/(4)` (from \\frac) -> 3/4; `- 7` -> -7; `-2 (1)/(2)` -> -5/2; `3x + 1` -> None.
    """
    s = re.sub(r"\(\s*([-+]?[\d.,]+)\s*\)", r"\1", s)  # (3)/(4) -> 3/4
    s = re.sub(r"^([-+])\s+(?=[\d.])", r"\1", s)  # a leading sign keeps its number: - 7 -> -7
    m = _NUMBER_RE.search(s)
    if m is None or _BEFORE_RE.search(s, 0, m.start()) or _AFTER_RE.match(s, m.end()):
        return None  # the number is only part of the answer (see the module docstring)
    whole, num, den = m.groups()
    try:  # the denominator of a plain number is 1
        value = Fraction(num.replace(",", "")) / Fraction((den or "1").replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    if whole is not None:  # 2 1/2 = 5/2, -2 1/2 = -5/2
        value = Fraction(whole) + (-value if whole.startswith("-") else value)
    return value


def _squash(s):
    return re.sub(r"\s+", "", s).lower()


def is_equiv(pred, gold):
    """Does the answer string `pred` mean the gold answer `gold`?"""
    if pred is None:
        return False
    pred, gold = clean_answer(str(pred)), clean_answer(str(gold))
    g = parse_number(gold)
    if g is not None:
        return parse_number(pred) == g
    return pred != "" and _squash(pred) == _squash(gold)


def grade(text, gold):
    """Is the final answer of the plain text `text` correct? For teacher traces, whose structure is their
    text; a sampled rollout is graded from its tokens by reward_rollout."""
    return is_equiv(extract_answer(main_text(text)), gold)

# -----------------------------------------------------------------------------
# 3) rewards and schedules

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
    """Steps count from 1; the last `tiered` steps of each window (9, 10, 19, 20, ...) are tiered."""
    return (step - 1) % window >= window - tiered


SCHEDULES = ("accuracy", "parallel", "tiered", "alternating", "scaffold")


def reward_fn(schedule, step, scaffold_until=200):
    """The reward function a schedule uses at RL step `step` (counted from 1).

    accuracy: R_acc always. parallel: the easy-stage reward always. tiered: always.
    alternating (S2): R_acc, except tiered on steps 9-10 of each window of 10.
    scaffold (paper): alternating for steps 1..scaffold_until, then R_acc.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown reward schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "scaffold":
        schedule = "alternating" if step <= scaffold_until else "accuracy"
    if schedule == "alternating":
        return tiered_reward if is_tiered_step(step) else r_acc
    return {"accuracy": r_acc, "parallel": parallel_reward, "tiered": tiered_reward}[schedule]


def reward_rollout(rollout, gold, schedule="accuracy", step=1, scaffold_until=200):
    """(reward, metrics) of one rollout.Rollout under a reward schedule at an RL step (from 1).

    The structure comes from the rollout's tag tokens (module docstring, 0): format_ok = they are
    well formed; has_block = format_ok and a block of >= 2 paths; a malformed rollout counts 0 blocks.
    The answer comes from its main-line tokens, so correctness does not depend on the format.
    """
    fn = reward_fn(schedule, step, scaffold_until)
    answer = extract_answer(rollout.main_text)
    correct = is_equiv(answer, gold)
    format_ok = rollout.format_error is None
    num_blocks = len(rollout.blocks) if format_ok else 0
    has_block = format_ok and any(len(b.paths) >= 2 for b in rollout.blocks)
    reward = fn(correct, has_block)
    return reward, {"reward": reward, "correct": correct, "answer": answer, "has_answer": answer is not None,
                    "format_ok": format_ok, "has_block": has_block, "num_blocks": num_blocks, "reward_fn": fn.__name__}
