"""
bench/bench_sampler.py: how fast is the branching sampler? (a benchmark script, not a test)

    python bench/bench_sampler.py                      # the toy-sized Qwen3 (random weights), CPU
    python bench/bench_sampler.py --hidden 256 --layers 8
    python bench/bench_sampler.py --model out/toy-sft --device cuda

In one run, on one model and the same prompts:
  (a) tokens/s of the sampler with parallel off vs `model.generate`, greedy, batch 1, 8, 32
      (greedy, so both decode exactly the same tokens);
  (b) a fork after a long prefix: cloning the prefix's KV cache into N path rows vs
      re-prefilling the prefix once per path (the fork alone, and the fork + the paths' first tokens);
  (c) N paths decoded together (one forward per step) vs the same paths one after another.
Each figure is the best of --repeats runs. Random weights are fine: speed does not depend on them.
"""

import argparse
import time

import torch

from nanopr1.format import PARALLEL, PATH
from nanopr1.model import load, tag_ids
from nanopr1.kvcache import KVRows
from nanopr1.sampler import sample


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def random_prompts(n, lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab[0], vocab[1], (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def bench_generate(model, tok, prompts, max_new, repeats):
    """(a) parallel-off sampler vs model.generate, greedy; returns (ours tok/s, generate tok/s)."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = {}

    def ours():
        out["ours"] = sum(len(r.ids) for r in sample(model, tok, prompts, max_new_tokens=max_new, temperature=0,
                                                     parallel=False))

    def theirs():
        g = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, P:]
        out["generate"] = sum(int((row != tok.pad_token_id).sum()) for row in g)

    t_ours, t_gen = best(ours, repeats), best(theirs, repeats)
    return out["ours"] / t_ours, out["generate"] / t_gen


@torch.inference_mode()
def bench_fork(model, prefix, n_paths, path_tokens, tags, repeats):
    """(b) fork by cloning vs re-prefilling; times in seconds (fork only, fork + path tokens)."""
    dev = model.device
    L = len(prefix)
    kv = KVRows([], torch.zeros(1, 0, dtype=torch.bool, device=dev))
    kv.forward(model, torch.tensor([prefix], device=dev), torch.arange(L, device=dev)[None],
               torch.ones(1, L, dtype=torch.bool, device=dev))  # the main line's prefill: paid once either way

    def decode(rows, first):
        ids = torch.full((n_paths, 1), tags[PATH], device=dev)
        for j in range(first, path_tokens):  # the paths' tokens after the fork
            rows.forward(model, ids, torch.full((n_paths, 1), L + j, device=dev),
                         torch.ones(n_paths, 1, dtype=torch.bool, device=dev))

    def clone(then_decode):
        rows = kv.rows([0] * n_paths)
        if then_decode:
            decode(rows, 0)

    def reprefill(then_decode):
        ids = torch.tensor([prefix + [tags[PATH]]] * n_paths, device=dev)
        rows = KVRows([], torch.zeros(n_paths, 0, dtype=torch.bool, device=dev))
        rows.forward(model, ids, torch.arange(L + 1, device=dev).repeat(n_paths, 1),
                     torch.ones(n_paths, L + 1, dtype=torch.bool, device=dev))
        if then_decode:
            decode(rows, 1)

    return ([best(lambda: clone(d), repeats) for d in (False, True)],
            [best(lambda: reprefill(d), repeats) for d in (False, True)])


@torch.inference_mode()
def bench_together(model, prefix, n_paths, path_tokens, repeats):
    """(c) N paths in one batch vs one after another; times in seconds."""
    dev, L = model.device, len(prefix)
    kv = KVRows([], torch.zeros(1, 0, dtype=torch.bool, device=dev))
    kv.forward(model, torch.tensor([prefix], device=dev), torch.arange(L, device=dev)[None],
               torch.ones(1, L, dtype=torch.bool, device=dev))

    def run(n_rows, times):
        for _ in range(times):
            rows = kv.rows([0] * n_rows)
            for j in range(path_tokens):
                rows.forward(model, torch.full((n_rows, 1), 5, device=dev), torch.full((n_rows, 1), L + j, device=dev),
                             torch.ones(n_rows, 1, dtype=torch.bool, device=dev))

    return best(lambda: run(n_paths, 1), repeats), best(lambda: run(1, n_paths), repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="hub id or local directory (default: a random toy-sized Qwen3)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(a) tokens per rollout")
    p.add_argument("--prefixes", default="250,1000,2000", help="(b) prefix lengths")
    p.add_argument("--num-paths", type=int, default=4, help="(b) paths per block")
    p.add_argument("--path-tokens", type=int, default=32, help="(b, c) tokens per path")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model, tok = load(args.model, device=args.device)
    else:
        from nanopr1 import toy
        tok = toy.build_tokenizer()
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM
        from nanopr1.model import tiny_qwen3_config
        model = AutoModelForCausalLM.from_config(tiny_qwen3_config(len(tok), hidden=args.hidden, layers=args.layers),
                                                 attn_implementation="sdpa").to(args.device)
    model.eval()
    tags = tag_ids(tok)
    lo = max(tags.values()) + 1  # ordinary tokens only: no tags, no special tokens in the prompts
    vocab = (lo, len(tok))
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: {args.model or 'random Qwen3'} ({n_params / 1e6:.2f} M parameters, hidden {model.config.hidden_size}, "
          f"{model.config.num_hidden_layers} layers, vocab {len(tok)}), device {args.device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")

    print(f"\n(a) parallel off vs model.generate, greedy, {args.max_new_tokens} new tokens, prompts of 20-40 tokens")
    for batch in (1, 8, 32):
        prompts = random_prompts(batch, [20, 33, 27, 40], vocab)
        ours, gen = bench_generate(model, tok, prompts, args.max_new_tokens, args.repeats)
        print(f"  batch {batch:3d}: sampler {ours:8.0f} tok/s   generate {gen:8.0f} tok/s   ratio {ours / gen:5.2f}x")

    print(f"\n(b) fork into {args.num_paths} paths after a long prefix: KV cloning vs re-prefilling the prefix per path")
    for L in [int(x) for x in args.prefixes.split(",")]:
        prefix = random_prompts(1, [L - 1], vocab)[0] + [tags[PARALLEL]]
        (c0, c1), (r0, r1) = bench_fork(model, prefix, args.num_paths, args.path_tokens, tags, args.repeats)
        print(f"  prefix {L:5d}: fork {c0 * 1e3:8.2f} ms vs {r0 * 1e3:8.2f} ms ({r0 / c0:7.1f}x)   "
              f"fork + {args.path_tokens} tokens/path {c1 * 1e3:8.1f} ms vs {r1 * 1e3:8.1f} ms ({r1 / c1:5.2f}x)")

    L = int(args.prefixes.split(",")[0])
    print(f"\n(c) N paths of {args.path_tokens} tokens after a {L}-token prefix: together vs one after another")
    prefix = random_prompts(1, [L], vocab)[0]
    for n in (2, 4, 8):
        together, serial = bench_together(model, prefix, n, args.path_tokens, args.repeats)
        print(f"  {n} paths: together {together * 1e3:8.1f} ms   one after another {serial * 1e3:8.1f} ms   "
              f"ratio {serial / together:5.2f}x")


if __name__ == "__main__":
    main()
