"""
sample.py: branched samples from a model, printed as a readable tree (or JSON).

    python sample.py --preset toy --prompt "Find x in 3 5 7 with x*3=21."
    python sample.py --model Qwen/Qwen3-4B-Base --prompt "What is 17 * 23?" --force-block
    python sample.py --model out/toy-sft --prompt "..." --n 4 --variant unseen --json
    python sample.py --show out/toy-hard/rollouts.jsonl --step 40     # what a training run kept

Single process only (no `accelerate launch`: sampling a few rollouts needs one device).
--force-block opens a block after the first line of the main text (or after N tokens with
--force-block N), so the tree can be shown with any model, even one never trained on the format.

Simplifications relative to the paper:
1. one prompt per call (--n rollouts of it); the batched sampler is the same one RL and eval use;
2. --json prints a rollout's row as OUT/rollouts.jsonl holds it (--show reads either back): the texts of
   its blocks, not its token-level data.
Piped into `head`, it stops quietly when the reader has gone.
"""

import argparse
import json
import os
import sys

import torch

from nanopr1 import recipes
from nanopr1.checkpoint import model_dir
from nanopr1.data import read_rows
from nanopr1.format import chat_prompt_ids
from nanopr1.model import load_model
from nanopr1.rewards import reward_rollout
from nanopr1.rollout import rollout_row, tree
from nanopr1.sampler import sample


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = parser.add_argument
    # model
    arg("--model", help="hub id or local directory (toy preset: the newest of out/toy-*)")
    arg("--preset", choices=["toy"], help="toy: the newest toy model, its prompt template and budget")
    arg("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, else float32)")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    # prompt
    arg("--prompt", help="the problem")
    arg("--prompt-file", help="a prompt template with a {problem} slot (default: the parallel prompt)")
    # sampling
    arg("--n", type=int, default=1, help="rollouts of the prompt")
    arg("--num-paths", type=int, default=2, help="paths per parallel block")
    arg("--max-blocks", type=int, default=4, help="parallel blocks per rollout (official rules: it ends after it)")
    arg("--max-new-tokens", type=int, default=3000, help="response budget, everything included")
    arg("--rules", choices=["official", "reserve"], default="official", help="official: a path is cut at "
        "--path-max-tokens, the response at --max-new-tokens; reserve: a block leaves room for the answer")
    arg("--path-max-tokens", type=int, help="one path's budget (official: the tokens between its tags, "
        "default 4096; reserve: its tags included, default its share)")
    arg("--temperature", type=float, default=1.0, help="0 = greedy")
    arg("--top-p", type=float, default=1.0)
    arg("--seed", type=int, default=0)
    arg("--variant", choices=["seen", "unseen"], default="seen", help="how paths are merged")
    arg("--no-parallel", action="store_true", help="plain sampling: tags are ordinary text")
    arg("--force-block", type=int, nargs="?", const=True, default=False, metavar="N",
        help="open a block after the first line of the main text, or after N response tokens")
    # output
    arg("--json", action="store_true", help="one JSON row per rollout, as in OUT/rollouts.jsonl (--show reads it)")
    arg("--show", metavar="FILE", help="print the rollouts a run kept (OUT/rollouts.jsonl) as trees")
    arg("--step", type=int, help="with --show: the step (default: the last)")
    return recipes.parse(parser, argv, "sample")


def show_file(path, step):
    """--show: rollout rows (a run's OUT/rollouts.jsonl, or what --json wrote), of one step or the last one."""
    rows = [row for row in read_rows(path) if isinstance(row, dict) and "main" in row]
    if not rows:
        sys.exit(f"error: {path} holds no rollouts (train_rl.py writes OUT/rollouts.jsonl)")
    step = rows[-1]["step"] if step is None else step
    rows = [row for row in rows if row["step"] == step]
    if not rows:
        sys.exit(f"error: {path} has no rollouts of step {step}")
    at = "" if step is None else f"step {step}, "  # rows from --json have no step
    for i, row in enumerate(rows):
        print(f"=== {at}rollout {i + 1}/{len(rows)} of {row['prompt'][-120:]!r}: {tree(row)}\n")


def main(argv=None):
    args = parse_args(argv)
    if args.show:
        return show_file(args.show, args.step)
    if not args.prompt:
        sys.exit("error: pass --prompt (or --show OUT/rollouts.jsonl)")
    name = args.model or (recipes.latest_toy_model() if args.preset == "toy" else None)
    if name is None:
        sys.exit("no toy model yet: run `python train_sft.py --preset toy` first" if args.preset == "toy"
                 else "error: pass --model (a hub id or a local directory) or --preset toy")
    try:  # the template first: a bad --prompt-file should not wait for the model to load
        template = recipes.template(args.prompt_file, args.preset == "toy", args.no_parallel)
        dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        model, tokenizer = load_model(model_dir(name), dtype=dtype, device=args.device)
        prompt = chat_prompt_ids(tokenizer, template, args.prompt)
        rollouts = sample(model.eval(), tokenizer, [prompt], args.n, num_paths=args.num_paths,
                          max_blocks=args.max_blocks, max_new_tokens=args.max_new_tokens,
                          path_max_tokens=args.path_max_tokens, rules=args.rules, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, variant=args.variant, parallel=not args.no_parallel,
                          force_block=args.force_block)
    except ValueError as e:  # UsageError, or a prompt the sampler refuses
        sys.exit(f"error: {e}")
    for i, rollout in enumerate(rollouts):
        row = rollout_row(rollout, tokenizer, reward_rollout(rollout, None)[1])  # no gold: only the answer read
        print(json.dumps(row, ensure_ascii=False) if args.json
              else f"=== rollout {i + 1}/{len(rollouts)}: {tree(row)}\n")


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()  # here, where a closed pipe can still be caught
    except BrokenPipeError:  # `sample.py --show FILE | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit: nowhere
