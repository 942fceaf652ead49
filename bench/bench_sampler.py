"""
bench/bench_sampler.py: how fast is the branching sampler? (a benchmark script, not a test)

    python bench/bench_sampler.py                      # the toy-sized Qwen3 (random weights), CPU
    python bench/bench_sampler.py --hidden 256 --layers 24 --only a,d   # a deeper model
    python bench/bench_sampler.py --model DIR          # a real model directory (its own vocabulary)

In one run, on one model and the same prompts, all through the package's one KV cache (kvcache.KVCache; its
decode step captured once per shape as a CUDA graph on a GPU, eager on a CPU unless graphs.CpuGraph is said):
  (a) tokens/s of the sampler with parallel off vs `model.generate`, greedy, batch 1, 8, 32
      (greedy, so both decode exactly the same tokens);
  (b) a fork after a long prefix: copying the prefix's row into N path rows (KVCache.copy_row) vs
      re-prefilling the prefix into each path row (the fork alone, and the fork + the paths' first tokens);
  (c) N paths decoded together (one forward per step) vs the same paths one after another;
  (d) one decode step of 32 rows with 256, 1,024 and 2,048 columns in the cache: transformers' DynamicCache
      (grown by concatenation every token) vs KVCache eager (use_graphs=False) vs KVCache with its captured step;
  (e) whole sample() calls, 64 rollouts with blocks: tokens/s without a row cap and with --max-rows, the first
      call on a new cache and later ones, the decode step as by default and captured (a CPU: CpuGraph);
  (f) peak memory of one sample() call of 32 vs 256 rollouts with the same --max-rows (peak RSS of a
      fresh process on a CPU, peak allocated on a GPU).
Each figure is the best of --repeats runs after a warm-up run (which captures the graphs: a cache is kept
across the repeats, as a training run keeps its cache across steps). Random weights are fine: speed does
not depend on them.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from nanopr1.format import PARALLEL, PATH, tag_ids
from nanopr1.kvcache import KVCache
from nanopr1.checkpoint import model_dir
from nanopr1.model import load_model
from nanopr1.sampler import sample


def best(fn, repeats, setup=lambda: None):
    """Seconds of fn(setup()): a warm-up run, then the best of `repeats` (setup untimed)."""
    fn(setup())
    times = []
    for _ in range(repeats):
        state = setup()
        t0 = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - t0)
    return min(times)


def random_prompts(n, lengths, vocab, seed=0):
    """n prompts of ordinary token ids (`vocab`: a list of the ids to draw from)."""
    g = torch.Generator().manual_seed(seed)
    return [[vocab[j] for j in torch.randint(len(vocab), (lengths[i % len(lengths)],), generator=g).tolist()]
            for i in range(n)]


def bench_generate(model, tok, prompts, max_new, repeats):
    """(a) parallel-off sampler vs model.generate, greedy; returns (ours tok/s, generate tok/s)."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    kv, out = KVCache(len(prompts), P + max_new + 1, model.device), {}

    def ours(_):
        out["ours"] = sum(len(r.ids) for r in sample(model, tok, prompts, max_new_tokens=max_new, temperature=0,
                                                     parallel=False, cache=kv))

    def theirs(_):
        g = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, P:]
        out["generate"] = sum(int((row != tok.pad_token_id).sum()) for row in g)

    t_ours, t_gen = best(ours, repeats), best(theirs, repeats)
    return out["ours"] / t_ours, out["generate"] / t_gen


def filled(kv, model, prefix, rows, copies=0):
    """Reset `kv` to `rows` rows, the prefix prefilled into row 0 and copied into rows 1..copies."""
    kv.reset(model)
    kv.add_rows(rows)
    if prefix:
        L = len(prefix)
        kv.prefill(model, torch.tensor([prefix]), torch.arange(L)[None], torch.ones(1, L, dtype=torch.bool), [0])
    for k in range(1, copies + 1):
        kv.copy_row(0, k)
    return kv


def decode(kv, model, token, start, steps, first=0):
    """`steps` decode steps of every row in use (token `token` at positions start+first, ...)."""
    n = kv.n
    for j in range(first, steps):
        kv.step(model, torch.full((n, 1), token), torch.full((n, 1), start + j), torch.ones(n, 1, dtype=torch.bool))


@torch.inference_mode()
def bench_fork(model, prefix, n_paths, path_tokens, tags, repeats):
    """(b) fork by copying rows vs re-prefilling; times in seconds (fork only, fork + path tokens). The main
    line's prefill is paid once either way (untimed)."""
    L, cols = len(prefix), len(prefix) + path_tokens + 2
    kv, fresh = KVCache(n_paths, cols, model.device), KVCache(n_paths, cols, model.device)

    def clone(then_decode):  # the forking row is path 1, the other paths copy it
        def run(kv):
            for k in range(1, n_paths):
                kv.copy_row(0, k)
            if then_decode:
                decode(kv, model, tags[PATH], L, path_tokens)
        return best(run, repeats, lambda: filled(kv, model, prefix, n_paths))

    def reprefill(then_decode):  # each path row prefilled with prefix + <Path> (one forward), then decoded
        def run(kv):
            ids = torch.tensor([prefix + [tags[PATH]]] * n_paths)
            kv.prefill(model, ids, torch.arange(L + 1).repeat(n_paths, 1), torch.ones(n_paths, L + 1, dtype=torch.bool),
                       list(range(n_paths)))
            if then_decode:
                decode(kv, model, tags[PATH], L, path_tokens, first=1)
        return best(run, repeats, lambda: filled(fresh, model, [], n_paths))

    return [clone(d) for d in (False, True)], [reprefill(d) for d in (False, True)]


@torch.inference_mode()
def bench_together(model, prefix, n_paths, path_tokens, repeats):
    """(c) N paths in one batch vs one after another (N times one path); seconds of the decode steps."""
    L = len(prefix)
    kv_n, kv_1 = KVCache(n_paths, L + path_tokens + 1, model.device), KVCache(1, L + path_tokens + 1, model.device)
    together = best(lambda kv: decode(kv, model, 5, L, path_tokens), repeats,
                    lambda: filled(kv_n, model, prefix, n_paths, n_paths - 1))
    one = best(lambda kv: decode(kv, model, 5, L, path_tokens), repeats, lambda: filled(kv_1, model, prefix, 1))
    return together, n_paths * one


@torch.inference_mode()
def bench_step(model, cols, rows, steps, vocab, repeats):
    """(d) seconds per decode step of `rows` rows whose caches hold `cols` columns."""
    dev, out = model.device, {}
    ids = torch.tensor(random_prompts(rows, [cols], vocab), device=dev)
    pos, ones = torch.arange(cols, device=dev).repeat(rows, 1), torch.ones(rows, cols, dtype=torch.bool, device=dev)
    feed = lambda j: (torch.full((rows, 1), vocab[j % len(vocab)], device=dev),
                      torch.full((rows, 1), cols + j, device=dev), torch.ones(rows, 1, dtype=torch.bool, device=dev))

    def concat(cache):  # transformers' DynamicCache: every row grows by torch.cat at each token
        mask = torch.ones(rows, cols, dtype=torch.long, device=dev)
        for j in range(steps):
            tok, p, _ = feed(j)
            mask = torch.cat([mask, mask[:, :1]], 1)
            cache = model(input_ids=tok, position_ids=p, attention_mask=mask, cache=cache, use_cache=True).cache

    def kvcache(kv):
        for j in range(steps):
            kv.step(model, *feed(j))

    def filled_rows(kv):
        kv.reset(model)
        kv.add_rows(rows)
        kv.prefill(model, ids, pos, ones, list(range(rows)))
        return kv

    out["concat"] = best(concat, repeats, lambda: model(input_ids=ids, position_ids=pos, use_cache=True).cache)
    for name, graphs in (("eager", False), ("graph", True)):
        kv = KVCache(rows, cols + steps + 1, dev, use_graphs=graphs)
        out[name] = best(kvcache, repeats, lambda: filled_rows(kv))
    return {k: t / steps for k, t in out.items()}


def bench_throughput(model, tok, prompts, max_new, caps, repeats, graphs=None):
    """(e) tokens/s of whole sample() calls with blocks (forced after 8 tokens), per row cap: (the first call
    on a new cache, which captures every shape it meets when the decode step is captured; the best later one)."""
    out, P = {}, max(len(p) for p in prompts)
    for cap in caps:
        # no cap: every rollout's 2 rows at once
        kv = KVCache(cap or len(prompts) * 4 * 2, P + max_new + 1, model.device, use_graphs=graphs)
        run = lambda _: out.__setitem__(("n", cap), sum(len(r.ids) for r in sample(
            model, tok, prompts, 4, max_new_tokens=max_new, seed=0, force_block=8, max_rows=cap,
            path_max_tokens=max_new // 4, cache=kv)))
        t0 = time.perf_counter()
        run(None)
        first = time.perf_counter() - t0
        out[cap] = (out[("n", cap)] / first, out[("n", cap)] / best(run, repeats))
    return {cap: out[cap] for cap in caps}


def peak_of_one_call(args, rollouts, cap):
    """(f) the peak memory of one sample() call, in a fresh process (peak RSS only ever grows)."""
    cmd = [sys.executable, __file__, "--peak", str(rollouts), "--peak-rows", str(cap or 0), "--device", args.device,
           "--threads", str(args.threads or torch.get_num_threads())]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def peak_rss():
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss it is not inherited from the
    parent across fork + exec)."""
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


PEAK_MODEL = dict(hidden=128, layers=8, heads=8, kv_heads=8)  # (f): a model whose KV cache dominates memory


def peak_child(args):
    from transformers import AutoModelForCausalLM
    from nanopr1 import toy
    from nanopr1.model import tiny_qwen3_config
    tok = toy.build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(len(tok), **PEAK_MODEL), attn_implementation="sdpa")
    model = model.to(args.device).eval()
    lo = max(tag_ids(tok).values()) + 1
    prompts = random_prompts(args.peak // 4, [64], list(range(lo, len(tok))))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = peak_rss()
    rollouts = sample(model, tok, prompts, 4, max_new_tokens=256, seed=0, force_block=16, path_max_tokens=64,
                      max_rows=args.peak_rows or None)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else peak_rss()
    print(json.dumps({"peak": peak, "before": base, "tokens": sum(len(r.ids) for r in rollouts)}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="hub id or local directory (default: a random toy-sized Qwen3)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", default="a,b,c,d,e,f", help="which parts to run")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(a, e) tokens per rollout")
    p.add_argument("--prefixes", default="250,1000,2000", help="(b) prefix lengths")
    p.add_argument("--num-paths", type=int, default=4, help="(b) paths per block")
    p.add_argument("--path-tokens", type=int, default=32, help="(b, c) tokens per path")
    p.add_argument("--columns", default="256,1024,2048", help="(d) columns in the cache")
    p.add_argument("--max-rows", type=int, default=16, help="(e, f) the row cap")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak", type=int, help=argparse.SUPPRESS)  # (f) the child process: one call of N rollouts
    p.add_argument("--peak-rows", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak:
        return peak_child(args)
    only = set(args.only.split(","))
    if args.model:
        model, tok = load_model(model_dir(args.model), device=args.device)
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
    special = set(tags.values()) | set(tok.all_special_ids)
    vocab = [i for i in range(min(len(tok), model.config.vocab_size)) if i not in special]  # ordinary tokens only
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: {args.model or 'random Qwen3'} ({n_params / 1e6:.2f} M parameters, hidden {model.config.hidden_size}, "
          f"{model.config.num_hidden_layers} layers, vocab {len(tok)}), device {args.device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} after a warm-up")

    if "a" in only:
        print(f"\n(a) parallel off vs model.generate, greedy, {args.max_new_tokens} new tokens, prompts of 20-40 tokens")
        for batch in (1, 8, 32):
            prompts = random_prompts(batch, [20, 33, 27, 40], vocab)
            ours, gen = bench_generate(model, tok, prompts, args.max_new_tokens, args.repeats)
            print(f"  batch {batch:3d}: sampler {ours:8.0f} tok/s   generate {gen:8.0f} tok/s   ratio {ours / gen:5.2f}x")

    if "b" in only:
        print(f"\n(b) fork into {args.num_paths} paths after a long prefix: copying the row vs re-prefilling the "
              f"prefix per path")
        for L in [int(x) for x in args.prefixes.split(",")]:
            prefix = random_prompts(1, [L - 1], vocab)[0] + [tags[PARALLEL]]
            (c0, c1), (r0, r1) = bench_fork(model, prefix, args.num_paths, args.path_tokens, tags, args.repeats)
            print(f"  prefix {L:5d}: fork {c0 * 1e3:8.2f} ms vs {r0 * 1e3:8.2f} ms ({r0 / c0:7.1f}x)   "
                  f"fork + {args.path_tokens} tokens/path {c1 * 1e3:8.1f} ms vs {r1 * 1e3:8.1f} ms ({r1 / c1:5.2f}x)")

    if "c" in only:
        L = int(args.prefixes.split(",")[0])
        print(f"\n(c) N paths of {args.path_tokens} tokens after a {L}-token prefix: together vs one after another")
        prefix = random_prompts(1, [L], vocab)[0]
        for n in (2, 4, 8):
            together, serial = bench_together(model, prefix, n, args.path_tokens, args.repeats)
            print(f"  {n} paths: together {together * 1e3:8.1f} ms   one after another {serial * 1e3:8.1f} ms   "
                  f"ratio {serial / together:5.2f}x")

    if "d" in only:
        print("\n(d) one decode step of 32 rows: transformers' DynamicCache (grown by torch.cat each token) vs "
              "KVCache eager vs KVCache's captured step (graphs.CpuGraph on a CPU)")
        for cols in [int(x) for x in args.columns.split(",")]:
            t = bench_step(model, cols, 32, 16, vocab, args.repeats)
            print(f"  {cols:5d} columns: concat {t['concat'] * 1e3:7.2f} ms   eager {t['eager'] * 1e3:7.2f} ms   "
                  f"graph {t['graph'] * 1e3:7.2f} ms   eager/graph {t['eager'] / t['graph']:5.2f}x   "
                  f"concat/graph {t['concat'] / t['graph']:5.2f}x")

    if "e" in only:
        print(f"\n(e) sample(): 16 prompts x 4 rollouts, forced 2-path blocks, {args.max_new_tokens} new "
              "tokens; tok/s of the first call on a new cache / of later calls\n    default: the decode step as "
              "KVCache runs it (a GPU: captured, a CPU: eager); captured: use_graphs=True (a CPU: the stand-in)")
        ps, cap = random_prompts(16, [20, 33, 27, 40], vocab), args.max_rows
        for name, graphs in (("default", None), ("captured", True)):
            rates = bench_throughput(model, tok, ps, args.max_new_tokens, [None, cap], args.repeats, graphs)
            print(f"  {name:8s}: no row cap {rates[None][0]:8.0f} / {rates[None][1]:8.0f} tok/s   --max-rows {cap}: "
                  f"{rates[cap][0]:8.0f} / {rates[cap][1]:8.0f} tok/s   ratio {rates[cap][1] / rates[None][1]:5.2f}x")

    if "f" in only:
        print(f"\n(f) peak memory of one sample() call (fresh process each; model {PEAK_MODEL}, 64-token prompts, "
              f"256 new tokens, 2-path blocks)")
        runs = {(n, cap): peak_of_one_call(args, n, cap) for n, cap in ((32, args.max_rows), (256, args.max_rows),
                                                                         (32, None), (256, None))}
        for (n, cap), r in runs.items():
            print(f"  {n:4d} rollouts, max_rows {cap or 'unbounded':>9}: peak {r['peak'] / 2**20:8.0f} MiB "
                  f"(before the call {r['before'] / 2**20:6.0f} MiB)")
        grow = lambda n, cap: runs[(n, cap)]["peak"] - runs[(n, cap)]["before"]  # what the call itself added
        for cap in (args.max_rows, None):
            print(f"  max_rows {cap or 'unbounded'}: 256 / 32 rollouts = "
                  f"{runs[(256, cap)]['peak'] / runs[(32, cap)]['peak']:.2f}x the peak, "
                  f"{grow(256, cap) / grow(32, cap):.2f}x what the call added")


if __name__ == "__main__":
    main()
