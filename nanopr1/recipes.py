"""
The settings of the runs in one place: the paper's RL recipes and every script's --preset toy.

`parse` applies the preset; train_rl.py fills the rest from the recipe of its (stage, variant) and
prints `table()` in its --help; `template` picks the prompt of bare problems.
"""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

from nanopr1 import UsageError, toy
from nanopr1.checkpoint import latest
from nanopr1.format import PARALLEL_PROMPT, SEQUENTIAL_PROMPT, load_template

# The RL recipes, one row each. The batch follows the official scripts that made the released
# checkpoints (256 prompts x 8 rollouts, PPO mini-batch 128: two optimizer steps per batch); the
# paper's text says 512. The easy stage has no official script: its row is the paper's text.
RL = [
    dict(stage="easy", variant="seen", init="out/sft", out="out/rl-easy", data="gsm8k", reward="parallel",
         grader="gsm8k", group_size=5, prompts_per_step=1024, steps=35),
    dict(stage="hard", variant="seen", init="out/rl-easy", out="out/rl-hard", data="dapo", reward="accuracy",
         grader="dapo", group_size=8, prompts_per_step=256, steps=300),
    dict(stage="hard", variant="unseen", init="out/sft-unseen", out="out/rl-unseen", data="dapo",
         reward="alternating", grader="dapo", group_size=8, prompts_per_step=256, steps=300),
    dict(stage="easy", variant="unseen", init="out/sft-unseen", out="out/rl-easy-unseen", data="gsm8k",
         reward="parallel", grader="gsm8k", group_size=5, prompts_per_step=1024, steps=35),  # not in the paper
]
# the CPU-sized curriculum on the toy world (nanopr1/toy.py): the same stages at the toy's sizes
_TOY = dict(grader="is_equiv", group_size=8, prompts_per_step=16)
TOY_RL = [
    dict(RL[0], init="out/toy-sft", out="out/toy-easy", data="toy:easy", steps=35, **_TOY),
    dict(RL[1], init="out/toy-easy", out="out/toy-hard", data="toy:hard", steps=40, **_TOY),
    dict(RL[2], init="out/toy-sft-unseen", out="out/toy-unseen", data="toy:hard", steps=40, **_TOY),
    dict(RL[3], init="out/toy-sft-unseen", out="out/toy-easy-unseen", data="toy:easy", steps=35, **_TOY),
]


def recipe(stage, variant, toy_preset=False):
    """The recipe row of (stage, variant): the flags it sets."""
    row = next(r for r in (TOY_RL if toy_preset else RL) if (r["stage"], r["variant"]) == (stage, variant))
    return {k: v for k, v in row.items() if k not in ("stage", "variant")}


def clip_high(reward):
    """The official clip-high: 0.28 in the S2 (alternating reward) run, 0.2 in every other (S1, scaffold)."""
    return 0.28 if reward == "alternating" else 0.2


def table():
    """The recipes as the text table --help prints."""
    cols = ("stage", "variant", "init", "data", "reward", "grader", "group_size", "prompts_per_step", "steps")
    head = ("stage", "variant", "starts from", "data", "reward", "grader", "group", "prompts", "steps", "clip-high")
    rows = [head] + [tuple(str(r[c]) for c in cols) + (str(clip_high(r["reward"])),) for r in RL]
    width = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, width)).rstrip() for r in rows]
    return "the recipes (explicit flags win):\n    " + "\n    ".join(lines) + """

Every recipe takes two optimizer steps per rollout batch (--mini-batches 2), as the official scripts
do (256 prompts, PPO mini-batch 128). Seen: SFT -> easy RL (correct AND a block) -> hard RL
(accuracy). Unseen skips easy RL; its default reward is S2 (alternating, clip-high 0.28);
--reward accuracy is S1 (clip-high 0.2). The exploration scaffold is a second run from S2's
step-200 checkpoint with a fresh optimizer and S1's settings:
    train_rl.py --variant unseen --steps 200 --out out/rl-unseen-200
    train_rl.py --variant unseen --reward accuracy --init out/rl-unseen-200 --out out/rl-scaffold"""


TOY = {  # --preset toy, per script (SFT: 800 steps of toy.sft_corpus(25600))
    "train_sft": dict(model=None, data=None, max_len=512, batch_size=32, micro_batch_tokens=8192,
                      lr=3e-3, warmup=0.04, epochs=1, save_every=400, grad_ckpt=False),
    "train_rl": dict(lr=5e-5, max_new_tokens=toy.MAX_NEW_TOKENS, micro_batch_tokens=16384,
                     eval_data="toy-hard", eval_n=4, eval_limit=100, save_every=25,
                     max_prompt_tokens=64, grad_ckpt=False),
    "eval": dict(datasets="toy-easy,toy-hard", n=4, max_new_tokens=toy.MAX_NEW_TOKENS,
                 batch_size=16),
    "sample": dict(max_new_tokens=toy.MAX_NEW_TOKENS),
}
TOY_STAGES = ("out/toy-hard", "out/toy-easy", "out/toy-sft")  # where the toy curriculum saves, newest first


class _Typed(argparse.Namespace):
    """Claims to hold every flag, so argparse fills in no default: what it ends up holding was typed."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own bookkeeping: not claimed
            raise AttributeError(name)


def typed_flags(parser, argv):
    """The flags typed in `argv` (abbreviated ones too): the preset and checkpoint.resume_args keep them."""
    return set(vars(parser.parse_args(argv, _Typed())))


def parse(parser, argv, script):
    """Parse argv; --preset toy's values for the flags not typed; args._typed: the flags typed (--resume)."""
    argv = negative_values(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    args._typed = typed_flags(parser, argv)
    if args.preset == "toy":  # the preset's value for every flag not typed
        for k, v in TOY[script].items():
            if k not in args._typed:
                setattr(args, k, v)
    args.script = script
    return args


def negative_values(argv):
    """`--lr -1e-4` as `--lr=-1e-4`: argparse takes a value that starts with '-' for a flag (so the
    range checks, not argparse, answer a negative number)."""
    out = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(r"-[\d.]+(e[-+]?\d+)?", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def check_ranges(args, parser, at_least):
    """Refuse a numeric flag out of its range, in one line. `at_least` maps a flag to its least value,
    or to (value, why): a float must be above it, an int that or more; any other flag 0 or more."""
    for a in parser._actions:
        value = getattr(args, a.dest, None)
        if a.type not in (int, float) or value is None:
            continue
        low, why = at_least.get(a.dest, 0), ""
        if isinstance(low, tuple):
            low, why = low[0], f" ({low[1]})"
        above = isinstance(low, float)
        if value < low or above and value <= low:
            raise UsageError(f"{a.option_strings[0]} {value}: must be {'above ' if above else ''}{low}"
                             f"{'' if above else ' or more'}{why}")


def check_out(out):
    """Refuse an output dir that is, or lies under, a file (one line, before anything loads)."""
    found = next((p for p in [Path(out), *Path(out).parents] if p.exists()), None) if out else None
    if found is not None and not found.is_dir():
        raise UsageError(f"--out {out}: {found} is a file, not a directory: choose another --out")


def check_tracker(report_to):
    """Refuse --report-to with a tracker that is not installed (before anything loads)."""
    if report_to not in (None, "none") and importlib.util.find_spec(report_to) is None:
        raise UsageError(f"--report-to {report_to}: {report_to} is not installed (pip install {report_to})")


def template(prompt_file=None, toy_preset=False, sequential=False):
    """The prompt template: --prompt-file's, the toy's (the question alone: toy models learn the format in
    SFT), or the sequential / parallel one."""
    if prompt_file:
        return load_template(prompt_file)
    if toy_preset:
        return toy.TEMPLATE
    return SEQUENTIAL_PROMPT if sequential else PARALLEL_PROMPT


def latest_toy_model():
    """The newest stage the toy curriculum has written (a run dir or a model dir), or None."""
    return next((d for d in TOY_STAGES if latest(d) or (Path(d) / "config.json").is_file()), None)
