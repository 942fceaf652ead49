"""
The settings of the runs in one place: the paper's RL recipes and every script's --preset toy.

`parse` applies the preset; train_rl.py fills the rest from RL (its --help prints the next two
paragraphs); `template` picks the prompt.

    stage  variant  starts from        data   reward                     group  prompts  steps  clip-high
    easy   seen     out/sft            gsm8k  parallel (correct+block)   5      1024     35     0.2
    hard   seen     out/rl-easy        dapo   accuracy                   8      512      300    0.2
    hard   unseen   out/sft-unseen     dapo   alternating (S2)           8      512      300    0.28
    easy   unseen   out/sft-unseen     gsm8k  parallel                   5      1024     35     0.28   (not in the paper)

Every recipe takes two optimizer steps per rollout batch (--mini-batches 2), as
the official scripts do (256 prompts, PPO mini-batch 128): the second step's
clipped ratio is live. The Seen recipe is SFT -> easy RL (reward: correct AND a block) -> hard RL
(accuracy); the Unseen one skips easy RL and uses the S2 alternating reward
with clip-high 0.28. The exploration scaffold is the reward schedule
`scaffold` (S2 until --scaffold-switch, then accuracy).
"""

import argparse

from nanopr1 import toy
from nanopr1.format import PARALLEL_PROMPT, SEQUENTIAL_PROMPT, load_template

RECIPE = ("init", "out", "data", "reward", "group_size", "prompts_per_step", "steps", "clip_high")
RL = {  # (stage, variant): the paper's settings (the table above), in RECIPE's order
    ("easy", "seen"): ("out/sft", "out/rl-easy", "gsm8k", "parallel", 5, 1024, 35, 0.2),
    ("hard", "seen"): ("out/rl-easy", "out/rl-hard", "dapo", "accuracy", 8, 512, 300, 0.2),
    ("hard", "unseen"): ("out/sft-unseen", "out/rl-unseen", "dapo", "alternating", 8, 512, 300, 0.28),
    ("easy", "unseen"): ("out/sft-unseen", "out/rl-easy-unseen", "gsm8k", "parallel", 5, 1024, 35, 0.28),
}
TOY_RL = {  # the CPU-sized curriculum on the toy world (nanopr1/toy.py)
    ("easy", "seen"): ("out/toy-sft", "out/toy-easy", "toy:easy", "parallel", 8, 16, 35, 0.2),
    ("hard", "seen"): ("out/toy-easy", "out/toy-hard", "toy:hard", "accuracy", 8, 16, 40, 0.2),
    ("hard", "unseen"): ("out/toy-sft-unseen", "out/toy-unseen", "toy:hard", "alternating", 8, 16, 40, 0.28),
    ("easy", "unseen"): ("out/toy-sft-unseen", "out/toy-easy-unseen", "toy:easy", "parallel", 8, 16, 35, 0.28),
}
RL = {k: dict(zip(RECIPE, row)) for k, row in RL.items()}  # {(stage, variant): {flag: value}}
TOY_RL = {k: dict(zip(RECIPE, row)) for k, row in TOY_RL.items()}
TOY = {  # --preset toy, per script (SFT: 800 steps of toy.sft_corpus(25600))
    "train_sft": dict(model=None, data=None, max_len=512, batch_size=32, micro_batch_tokens=8192,
                      lr=3e-3, warmup=0.04, epochs=1, save_every=400, grad_ckpt=False),
    "train_rl": dict(lr=5e-5, max_new_tokens=toy.MAX_NEW_TOKENS, micro_batch_tokens=16384,
                     eval_data="toy-hard", eval_n=4, eval_limit=100, save_every=25,
                     max_prompt_tokens=64),
    "eval": dict(datasets="toy-easy,toy-hard", n=4, max_new_tokens=toy.MAX_NEW_TOKENS,
                 batch_size=16),
    "sample": dict(max_new_tokens=toy.MAX_NEW_TOKENS),
}


def parse(parser, argv, script):
    """Parse argv with --preset toy's defaults (a typed flag wins); args._typed: the flags typed."""
    args = parser.parse_args(argv)
    if args.preset == "toy":  # parse again with the preset's defaults
        saved = {k: parser.get_default(k) for k in TOY[script]}
        parser.set_defaults(**TOY[script])
        try:
            args = parser.parse_args(argv)
        finally:
            parser.set_defaults(**saved)
    # parse once more with no defaults at all: what is left was typed
    defaults, parser_defaults = {a.dest: a.default for a in parser._actions}, parser._defaults
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    parser._defaults = {}
    try:
        args._typed = set(vars(parser.parse_args(argv))) | {"script"}  # the script: always compared
    finally:
        parser._defaults = parser_defaults
        for a in parser._actions:
            a.default = defaults[a.dest]
    args.script = script
    return args


def template(args):
    """The prompt template: --prompt-file's, the toy's, or the sequential / parallel one."""
    if getattr(args, "prompt_file", None):
        return load_template(args.prompt_file)
    if args.preset == "toy":
        return toy.TEMPLATE  # the question alone: toy models learn the format in SFT
    return SEQUENTIAL_PROMPT if getattr(args, "no_parallel", False) else PARALLEL_PROMPT
