"""
sample.py: branched samples from a model, printed as a readable tree (or JSON).

    python sample.py --preset toy --prompt "Find x in 3 5 7 with x*3=21."
    python sample.py --model Qwen/Qwen3-4B-Base --prompt "What is 17 * 23?" --force-block
    python sample.py --model out/toy-sft --prompt "..." --n 4 --variant unseen --json

Single process only (no `accelerate launch`: sampling a few rollouts needs one device).
--force-block opens a block after the first line of the main text (or after N tokens with
--force-block N), so the tree can be shown with any model, even one never trained on the format.

Simplifications relative to the paper:
1. one prompt per call (--n rollouts of it); the batched sampler is the same one RL and eval use;
2. --json prints one object per rollout with the texts of its blocks, not its token-level data.
"""

import argparse
import json
import sys

import torch

from nanopr1 import recipes, toy
from nanopr1.format import chat_prompt_ids
from nanopr1.model import load
from nanopr1.rewards import extract_answer
from nanopr1.sampler import sample


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--model", help="hub id or local directory (toy preset: the newest of out/toy-*)")
    p.add_argument("--preset", choices=["toy"], help="toy: the newest toy model, its prompt template and budget")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, else float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu | cuda (default: cuda if available)")
    # prompt
    p.add_argument("--prompt", required=True, help="the problem")
    p.add_argument("--prompt-file", help="a prompt template with a {problem} slot (default: the parallel prompt)")
    # sampling
    p.add_argument("--n", type=int, default=1, help="rollouts of the prompt")
    p.add_argument("--num-paths", type=int, default=2, help="paths per parallel block")
    p.add_argument("--max-blocks", type=int, default=4, help="parallel blocks per rollout")
    p.add_argument("--max-new-tokens", type=int, default=3000, help="response budget, everything included")
    p.add_argument("--path-max-tokens", type=int, default=None, help="budget of one path, its tags included")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=["seen", "unseen"], default="seen", help="how paths are merged")
    p.add_argument("--no-parallel", action="store_true", help="plain sampling: tags are ordinary text")
    p.add_argument("--force-block", type=int, nargs="?", const=-1, default=None, metavar="N",
                   help="open a block after the first line of the main text, or after N response tokens")
    # output
    p.add_argument("--json", action="store_true", help="one JSON object per rollout")
    return recipes.parse(p, argv, "sample")


def structure(rollout, tokenizer):
    """The texts of a rollout: main segments, and each block's paths and summary (tags stripped)."""
    dec = lambda a, b: tokenizer.decode(rollout.ids[a:b], skip_special_tokens=False)
    main, blocks, prev = [], [], 0
    for b in rollout.blocks:
        main.append(dec(prev, b.parallel))
        blocks.append({"paths": [dec(s + 1, e - 1) for s, e in b.paths],
                       "summary": dec(b.summary[0] + 1, b.summary[1] - 1)})
        prev = b.summary[1]
    main.append(dec(prev, len(rollout.ids) - (rollout.stop_reason == "eos")))  # the EOS token is not text
    return main, blocks


def indent(text, prefix):
    return "\n".join(prefix + line for line in text.strip("\n").split("\n"))


def show_tree(i, n, rollout, tokenizer):
    main, blocks = structure(rollout, tokenizer)
    print(f"=== rollout {i + 1}/{n}: {len(rollout.ids)} tokens, {len(blocks)} block(s), stop: {rollout.stop_reason}")
    for k, seg in enumerate(main):
        if seg.strip():
            print(indent(seg, "  "))
        if k < len(blocks):
            print(f"  ┌─ parallel block {k + 1}")
            for j, path in enumerate(blocks[k]["paths"]):
                print(f"  ├─ path {j + 1}")
                print(indent(path, "  │    "))
            print("  └─ summary")
            print(indent(blocks[k]["summary"], "       "))
    print(f"answer: {extract_answer(rollout.main_text)}\n")


def main(argv=None):
    args = parse_args(argv)
    name = args.model or (toy.latest_model() if args.preset == "toy" else None)
    if name is None:
        sys.exit("no toy model yet: run `python train_sft.py --preset toy` first" if args.preset == "toy"
                 else "error: pass --model (a hub id or a local directory) or --preset toy")
    force_block = False if args.force_block is None else (True if args.force_block < 0 else args.force_block)
    try:  # the template first: a bad --prompt-file should not wait for the model to load
        template = recipes.template(args)
        cuda = args.device.startswith("cuda")
        model, tokenizer = load(name, dtype=args.dtype or ("bfloat16" if cuda else "float32"), device=args.device)
        prompt = chat_prompt_ids(tokenizer, template, args.prompt)
        rollouts = sample(model.eval(), tokenizer, [prompt], args.n, num_paths=args.num_paths,
                          max_blocks=args.max_blocks, max_new_tokens=args.max_new_tokens, path_max_tokens=args.path_max_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed, variant=args.variant,
                          parallel=not args.no_parallel, force_block=force_block, fast=cuda)  # GPU: CUDA graphs
    except ValueError as e:  # UsageError, or a prompt the sampler refuses
        sys.exit(f"error: {e}")
    for i, r in enumerate(rollouts):
        if args.json:
            _, blocks = structure(r, tokenizer)
            print(json.dumps({"text": r.text, "blocks": blocks, "answer": extract_answer(r.main_text),
                              "num_tokens": len(r.ids), "stop_reason": r.stop_reason}, ensure_ascii=False))
        else:
            show_tree(i, len(rollouts), r, tokenizer)


if __name__ == "__main__":
    main()
