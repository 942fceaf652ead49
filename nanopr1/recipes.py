"""
The settings of the runs, in one place: the paper's RL recipe for each (stage,
variant), and the toy preset (`--preset toy`) of every script.

A script parses its flags with `parse(parser, argv, script)`: the toy preset
swaps defaults (never a flag the user typed); train_rl.py then fills whatever
is still unset from its (stage, variant) recipe. `template(args)` is the prompt
template every script uses.

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

RL = {  # (stage, variant): the paper's settings (the table above)
    ("easy", "seen"): dict(init="out/sft", out="out/rl-easy", data="gsm8k", reward="parallel", group_size=5,
                           prompts_per_step=1024, steps=35, clip_high=0.2),
    ("hard", "seen"): dict(init="out/rl-easy", out="out/rl-hard", data="dapo", reward="accuracy", group_size=8,
                           prompts_per_step=512, steps=300, clip_high=0.2),
    ("hard", "unseen"): dict(init="out/sft-unseen", out="out/rl-unseen", data="dapo", reward="alternating",
                             group_size=8, prompts_per_step=512, steps=300, clip_high=0.28),
    ("easy", "unseen"): dict(init="out/sft-unseen", out="out/rl-easy-unseen", data="gsm8k", reward="parallel",
                             group_size=5, prompts_per_step=1024, steps=35, clip_high=0.28),
}
TOY_RL = {  # the CPU-sized curriculum on the toy world (nanopr1/toy.py)
    ("easy", "seen"): dict(init="out/toy-sft", out="out/toy-easy", data="toy:easy", reward="parallel", group_size=8,
                           prompts_per_step=16, steps=35, clip_high=0.2),
    ("hard", "seen"): dict(init="out/toy-easy", out="out/toy-hard", data="toy:hard", reward="accuracy", group_size=8,
                           prompts_per_step=16, steps=40, clip_high=0.2),
    ("hard", "unseen"): dict(init="out/toy-sft-unseen", out="out/toy-unseen", data="toy:hard", reward="alternating",
                             group_size=8, prompts_per_step=16, steps=40, clip_high=0.28),
    ("easy", "unseen"): dict(init="out/toy-sft-unseen", out="out/toy-easy-unseen", data="toy:easy",
                             reward="parallel", group_size=8, prompts_per_step=16, steps=35, clip_high=0.28),
}
TOY = {  # --preset toy, per script
    "train_sft": dict(model=None, data=None, max_len=512, batch_size=32, micro_batch_tokens=8192, lr=3e-3,
                      warmup=0.04, epochs=1, save_every=400, grad_ckpt=False),  # 800 steps of toy.sft_corpus(25600)
    "train_rl": dict(lr=5e-5, max_new_tokens=toy.MAX_NEW_TOKENS, micro_batch_tokens=16384,
                     eval_data="toy-hard", eval_n=4, eval_limit=100, save_every=25, max_prompt_tokens=64),
    "eval": dict(datasets="toy-easy,toy-hard", n=4, max_new_tokens=toy.MAX_NEW_TOKENS, batch_size=16),
    "sample": dict(max_new_tokens=toy.MAX_NEW_TOKENS),
}


def parse(parser, argv, script):
    """Parse argv with the toy preset's defaults swapped in when --preset toy is given (the parser simply
    runs again with them: a flag the user typed always wins). args._typed: the flags typed (--resume keeps
    the run's stored value of every other one)."""
    args = parser.parse_args(argv)
    if args.preset == "toy":
        saved = {k: parser.get_default(k) for k in TOY[script]}
        parser.set_defaults(**TOY[script])
        try:
            args = parser.parse_args(argv)
        finally:
            parser.set_defaults(**saved)
    defaults, parser_defaults = {a.dest: a.default for a in parser._actions}, parser._defaults
    for a in parser._actions:  # parsed once more with no defaults at all: what is left was typed
        a.default = argparse.SUPPRESS
    parser._defaults = {}
    try:
        args._typed = set(vars(parser.parse_args(argv))) | {"script"}  # (which script: always compared)
    finally:
        parser._defaults = parser_defaults
        for a in parser._actions:
            a.default = defaults[a.dest]
    args.script = script
    return args


def template(args):
    """The prompt template: --prompt-file, else the toy's (the question alone: toy models learn the format
    in SFT), else the sequential baseline's (--no-parallel), else the parallel-thinking instruction."""
    if getattr(args, "prompt_file", None):
        return load_template(args.prompt_file)
    if args.preset == "toy":
        return toy.TEMPLATE
    return SEQUENTIAL_PROMPT if getattr(args, "no_parallel", False) else PARALLEL_PROMPT
