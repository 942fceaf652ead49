"""
bench/bench_4b.py: the one script for a GPU hour. nanopr1 at Qwen3-4B scale on one H100 / H200.

    python bench/bench_4b.py --out bench_4b.json                # one H100/H200: about 7 minutes (estimate below)
    python bench/bench_4b.py --tiny --out /tmp/b.json           # CPU: the very same code at tiny sizes, ~30 s
    python bench/bench_4b.py --skip decode_256,train_rl --out b.json   # leave sections out (a prefix: "decode")

A Qwen3-4B-shaped model with random weights (nothing downloaded; speed and memory do not depend on them), EOS
off: rollouts run to their budget. Each section builds what it needs and frees it all at its end; one that fails
(out of memory, any exception) is recorded with its error line and the next one runs. --out is rewritten after
every section: a crash loses nothing measured before it. Timings: a warm-up, then --repeats runs (best, mean).
  equal       (0) the KV cache's captured decode step (CUDA graphs) vs the same cache eager (use_graphs=False),
              temperature 0, parallel off / Seen / Unseen 2-path blocks, max_rows below the rollouts' rows
              (admissions): identical tokens and max |log-prob difference|, tiny fp32 (1.0, < 1e-5) and big bf16.
  decode_R    (1, 2) R = 1, 64, 256 rows, greedy, parallel off, 512-token prompts, 512 new tokens: tokens/s of
              the captured step (the repeats reuse the cache and its graphs; capture_s apart) and, for R in
              --eager-rows, eager; decode-only tokens/s (prefill timed apart) vs the bandwidth floor (weight + KV
              bytes read per step / measured copy bandwidth); graphs, graph pool GB (KVCache.stats()) vs plan.
  grpo_lora, grpo_full  (3) one GRPO step (scoring.rollout_logprobs + grpo.policy_loss + AdamW, grad
              checkpointing, bf16 autocast on CUDA), 8 rollouts of 512 + 512 tokens, micro-batches of 4: time,
              tokens/s, MFU (6N), peak above the model states (plan.peak_bytes) vs training_transient + grads.
  train_rl    (4) one real `train_rl.py --lora` step (subprocess; this model, the toy tokenizer, toy:hard): wall
              time, its memory plan vs its "measured:" and "KV cache:" lines, metrics row, checkpoint size
              (--lora: full fine-tune + sampling copy do not fit 80 GB, as the plan says).
Estimate on one H100/H200: equal 0.5 min, decode 4 min (half of it eager), grpo 1 min, train_rl 1.5 min: ~7
min. Dropped to fit: model.generate, SFT timing, flex attention (git history). Figures: docs/results.md, "GPU".
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from nanopr1 import toy
from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, TAGS
from nanopr1.grpo import policy_loss
from nanopr1.kvcache import KVCache, kv_bytes_per_token
from nanopr1.model import add_tags, apply_lora
from nanopr1.plan import POOL_BYTES, memory_plan, peak_bytes, training_transient
from nanopr1.rollout import make_rollout
from nanopr1.sampler import sample
from nanopr1.scoring import rollout_logprobs

ROOT = Path(__file__).resolve().parents[1]
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000, tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)
SIZES = dict(rows="1,64,256", eager_rows="1,64", prompt=512, new_tokens=512, grpo_rollouts=8, micro_batch=4,
             rl_prompts=8, rl_group=8, rl_new_tokens=512, rl_micro_tokens=16384)
TINY_SIZES = dict(rows="1,4,8", eager_rows="1,4", prompt=32, new_tokens=24, grpo_rollouts=4, micro_batch=2,
                  rl_prompts=2, rl_group=2, rl_new_tokens=12, rl_micro_tokens=2048)
RESULTS = {}


class IdTokenizer:
    """What the sampler needs of a tokenizer: the tag ids (Qwen3's 151669.. at 4B), no EOS."""

    def __init__(self, vocab_size):
        first = 151669 if vocab_size == 151936 else vocab_size - len(TAGS)
        self.vocab, self.eos_token_id, self.pad_token_id = {t: first + i for i, t in enumerate(TAGS)}, None, 0

    def get_vocab(self):
        return dict(self.vocab)

    def decode(self, ids, **kw):
        return " ".join(map(str, ids))

    def __call__(self, text, add_special_tokens=False):  # text (the "\n" after a block): ordinary ids
        return {"input_ids": [10] * len(text)}


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def repeat(fn, n):
    """A warm-up run, then n timed runs: (best, mean) seconds."""
    sync, times = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None, []
    for i in range(n + 1):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times += [time.perf_counter() - t0] if i else []
    return min(times), sum(times) / len(times)


def build(cfg, dtype, device):
    with torch.device(device):  # random init straight on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(Qwen3Config(**cfg), dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.eval()


def prompts(n, length, tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(tok.vocab.values()), (n, length), generator=g).tolist()

# -----------------------------------------------------------------------------
# (0) captured == eager; (1, 2) decode speed
CASES = [("parallel off", dict(parallel=False)), ("seen blocks", dict(variant="seen", force_block=8)),
         ("unseen blocks", dict(variant="unseen", force_block=8))]


def equal(args, res):
    """(0) the captured decode step == eager (use_graphs=False), temperature 0, tiny fp32 and big bf16 models."""
    for label, cfg, dtype in (("tiny fp32", TINY, torch.float32), ("model bf16", args.cfg, torch.bfloat16)):
        model, tok = build(cfg, dtype, args.device), IdTokenizer(cfg["vocab_size"])
        for name, kw in CASES:
            ps, runs, stats = prompts(4, 24, tok, seed=1), [], None  # 6 rows: 6 or 3 of the 8 rollouts
            for graphs in (True, False):
                kv = KVCache(6, 24 + 40 + 1, args.device, use_graphs=graphs)
                runs.append(sample(model, tok, ps, 2, max_new_tokens=40, temperature=0, path_max_tokens=12,
                                   max_rows=6, cache=kv, **kw))
                stats = stats or kv.stats()
            a, b = runs
            n = sum(max(len(r.ids), len(q.ids)) for r, q in zip(a, b))
            same = sum(x == y for r, q in zip(a, b) for x, y in zip(r.ids, q.ids)) / n
            first = [next((i for i, (x, y) in enumerate(zip(r.ids, q.ids)) if x != y), len(r.ids))
                     for r, q in zip(a, b)]
            diff = max((abs(x - y) for r, q, k in zip(a, b, first) for x, y in zip(r.logprobs[:k], q.logprobs[:k])),
                       default=0.0)
            blocks = sum(r.ids.count(tok.vocab[PARALLEL]) for r in a)  # opened (a cut one too)
            print(f"  {label:10s} {name:13s}: identical tokens {same:7.2%}   max |log-prob difference| {diff:.2e}"
                  f"   blocks {blocks}   graphs {stats['graphs']} {stats.get('graph_error', '')}", flush=True)
            res[f"{label}/{name}"] = dict(identical=same, max_logprob_diff=diff, blocks=blocks, **stats)


def bandwidth(device):
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    best, _ = repeat(lambda: [b.copy_(a) for _ in range(10)], 2)
    return 2 * n * 10 / best  # bytes read + written per second


def decode(args, res, R):
    """(1, 2) decode tokens/s of R rows vs the bandwidth floor: greedy, parallel off, to the budget."""
    P, N, dev = args.prompt, args.new_tokens, args.device
    model, tok = build(args.cfg, torch.bfloat16, dev), IdTokenizer(args.cfg["vocab_size"])
    ps, bw = prompts(R, P, tok), bandwidth(dev)
    W = sum(q.numel() * q.element_size() for q in model.parameters())  # weight bytes read per step
    kvt = kv_bytes_per_token(model.config, torch.bfloat16)
    floor = (N - 1) * (W + R * (P + N / 2) * kvt) / bw  # N-1 decode steps, mean context P + N/2
    res.update(rows=R, prompt=P, new_tokens=N, weight_gb=W / 1e9, kv_kib_per_token=kvt / 1024,
               copy_bandwidth_gbs=bw / 1e9, floor_decode_tokens_per_s=R * (N - 1) / floor,
               plan_pool_gb=R * args.cfg["vocab_size"] * POOL_BYTES / 1e9)  # vs the measured graph_pool_gb
    for mode in ("graphs", "eager") if R in args.eager_rows else ("graphs",):
        kv = KVCache(R, P + N + 1, dev, use_graphs=mode == "graphs")
        run = lambda n: sample(model, tok, ps, 1, max_new_tokens=n, temperature=0, parallel=False, cache=kv)
        assert sum(len(r.ids) for r in run(N)) == R * N  # the warm-up: captures every graph
        warm = kv.stats()
        best, mean = repeat(lambda: run(N), args.repeats)  # the same cache: its graphs are replayed
        prefill, _ = repeat(lambda: run(1), args.repeats)  # prefill + one sampled token, no decode step
        stats, decode_s = kv.stats(), max(best - prefill, 1e-9)
        res[mode] = dict(tokens_per_s_best=R * N / best, tokens_per_s_mean=R * N / mean, prefill_s=prefill,
                         decode_tokens_per_s=R * (N - 1) / decode_s, share_of_floor=floor / decode_s,
                         captures_in_repeats=stats["graphs"] - warm["graphs"], **stats)
        print(f"  {R:4d} rows {mode:6s}: {R * N / best:9.1f} tok/s best ({R * N / mean:9.1f} mean)   prefill "
              f"{prefill:.3g} s   decode {R * (N - 1) / decode_s:9.1f} tok/s = {floor / decode_s:6.1%} of the "
              f"floor ({R * (N - 1) / floor:9.1f})   graphs {stats['graphs']} ({stats['capture_s']:.1f} s to "
              f"capture, pool {stats['graph_pool_gb']:.3g} GB, plan {res['plan_pool_gb']:.3g}) "
              + stats.get("graph_error", ""), flush=True)
        kv = run = None  # this mode's cache freed before the next one
        free()
    if "eager" in res:
        res["graphs_over_eager"] = res["graphs"]["tokens_per_s_best"] / res["eager"]["tokens_per_s_best"]
        print(f"  captured / eager: {res['graphs_over_eager']:.2f}x")

# -----------------------------------------------------------------------------
# (3) one GRPO step; (4) one train_rl.py step
def synthetic(tok, P, N, g):
    """A rollout with one 2-path block: prompt P tokens, response N tokens, tags forced."""
    t, k, s = tok.vocab, N // 4, min(8, N // 8)
    words = lambda n: torch.randint(10, min(t.values()), (n,), generator=g).tolist()
    ids = ([t[PARALLEL], t[PATH]] + words(k) + [t[PATH_END], t[PATH]] + words(k) + [t[PATH_END], t[PARALLEL_END],
           t[SUMMARY]] + words(s) + [t[SUMMARY_END]])
    ids += words(N - len(ids))
    return make_rollout(tok, words(P), ids, "budget", [i in t.values() for i in ids])


def grpo_step(model, opt, rollouts, tags, micro, device):
    n_tokens = sum(sum(not f for f in r.forced) for r in rollouts)
    adv = torch.randn(len(rollouts))
    for i in range(0, len(rollouts), micro):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logp, mask = rollout_logprobs(model, rollouts[i:i + micro], tags, "seen", 1.0, 0, device)
            loss, _ = policy_loss(logp, logp.detach() + 0.01, adv[i:i + micro].to(logp), mask, n_tokens)
        loss.backward()
    torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def grpo(args, res, lora):
    """(3) one GRPO step, LoRA (bf16 base on CUDA, as train_rl) or full (fp32, AdamW), vs the memory plan."""
    dev, cuda, P, N, micro = args.device, args.device.type == "cuda", args.prompt, args.new_tokens, args.micro_batch
    tok, g = IdTokenizer(args.cfg["vocab_size"]), torch.Generator().manual_seed(0)
    model = build(args.cfg, torch.bfloat16 if lora and cuda else torch.float32, dev)
    n_params = sum(q.numel() for q in model.parameters())
    if lora:
        model = apply_lora(model, r=64, alpha=128, train_tokens=list(tok.vocab.values()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = [q for q in model.train().parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-6, foreach=True)  # as train_rl
    rollouts = [synthetic(tok, P, N, g) for _ in range(args.grpo_rollouts)]
    tokens = sum(len(r.prompt_ids) + len(r.ids) for r in rollouts)
    step = lambda: grpo_step(model, opt, rollouts, tok.vocab, micro, dev)
    best, mean = repeat(step, args.repeats)  # the warm-up makes AdamW's states
    peak = peak_bytes(step, dev)  # above the weights and AdamW's states (it empties the allocator's cache first)
    config, T, n_trained = Qwen3Config(**args.cfg), micro * (P + N), sum(q.numel() for q in trained)
    transient = training_transient(config, T, P + N, grad_ckpt=True, autocast=cuda, trained=n_trained)
    grads = sum(q.numel() * q.element_size() for q in trained)
    gpu = torch.cuda.get_device_properties(dev).total_memory if cuda else 80e9
    plan = memory_plan(config, gpu_bytes=gpu, lora_r=64 if lora else 0, micro_batch_tokens=T, sampling=False,
                       max_prompt_tokens=P, max_new_tokens=N)
    mfu = 6 * n_params * tokens / best / (args.peak_tflops * 1e12) if cuda else None
    res.update(rollouts=len(rollouts), micro_batch_tokens=T, step_s_best=best, step_s_mean=mean,
               tokens_per_s=tokens / best, mfu_6n=mfu, peak_above_states_gb=peak / 1e9,
               plan_transient_plus_grads_gb=(transient + grads) / 1e9, plan_transient_gb=transient / 1e9,
               plan_total_gb=plan.total / 1e9, plan_fits=plan.fits,
               peak_reserved_gb=torch.cuda.max_memory_reserved(dev) / 1e9 if cuda else None)
    print(f"  {'LoRA r=64' if lora else 'full':9s}: step {best:.3g} s best ({mean:.3g} mean)   {tokens / best:9.0f} "
          f"tok/s   MFU(6N) {f'{mfu:.1%}' if cuda else '-'}   peak above the states {peak / 1e9:.3g} GB, plan "
          f"{(transient + grads) / 1e9:.3g} GB (transient {transient / 1e9:.3g} + gradients)   plan total "
          f"{plan.total / 1e9:.1f} GB", flush=True)


def train_rl(args, res):
    """(4) one real train_rl.py step (--lora) in a subprocess, on this model saved with the toy tokenizer."""
    work = Path(tempfile.mkdtemp(prefix="bench_4b_"))
    try:
        tok, model = toy.build_tokenizer(), build(args.cfg, torch.bfloat16, args.device)
        for c in (model.config, model.generation_config):
            c.eos_token_id, c.pad_token_id = tok.eos_token_id, tok.pad_token_id
        add_tags(model, tok)
        model.save_pretrained(work / "init")
        tok.save_pretrained(work / "init")
        del model  # the subprocess needs the GPU: run_sections freed the rest before this section
        free()
        cmd = [sys.executable, "train_rl.py", "--init", str(work / "init"), "--data", "toy:hard", "--steps", "1",
               "--lora", "--prompts-per-step", str(args.rl_prompts), "--group-size", str(args.rl_group),
               "--max-new-tokens", str(args.rl_new_tokens), "--micro-batch-tokens", str(args.rl_micro_tokens),
               "--out", str(work / "run"), "--overwrite"]
        res["command"] = " ".join(cmd[1:])
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.rl_timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})  # nothing to fetch: never wait for the hub
        res["wall_s"], lines = time.perf_counter() - t0, done.stdout.splitlines()
        res["stdout_tail"], res["stderr_tail"] = done.stdout[-3000:], done.stderr[-3000:]
        start = next((i for i, x in enumerate(lines) if x.startswith("memory plan per GPU:")), None)
        if start is not None:  # CUDA only: the plan, up to its verdict
            end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines) - 1)
            res["plan"] = lines[start:end + 1]
            total = [x.split() for x in res["plan"] if x.split()[:1] == ["total"]]
            res["plan_total_gb"] = float(total[0][1]) if total else None
        res["measured"] = [x for x in lines if x.startswith(("measured:", "KV cache:"))]  # vs the plan's
        metrics, saved = work / "run" / "metrics.jsonl", list((work / "run").glob("checkpoint-*/**/*"))
        if metrics.exists():
            res["metrics"] = json.loads(metrics.read_text().splitlines()[-1])
        res["checkpoint_gb"] = sum(f.stat().st_size for f in saved if f.is_file()) / 1e9
        print(f"  train_rl.py exited {done.returncode} after {res['wall_s']:.1f} s", *res.get("plan", []),
              *res["measured"], f"checkpoint: {res['checkpoint_gb']:.2f} GB", sep="\n  ", flush=True)
        if done.returncode:
            raise RuntimeError(f"train_rl.py exited {done.returncode}: {(done.stderr.strip() or '?').splitlines()[-1]}")
        if len(res["measured"]) < 1 + (args.device.type == "cuda") or "metrics" not in res:
            raise RuntimeError("train_rl.py printed no 'measured:' or 'KV cache:' line or wrote no metrics row")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(path):
    if path:  # a whole file or none: a kill while writing keeps the previous one
        Path(f"{path}.tmp").write_text(json.dumps(RESULTS, indent=1, default=str))
        os.replace(f"{path}.tmp", path)


def run_sections(sections, args):
    """Each section on its own: memory freed before and after, a failure recorded and passed over, --out written."""
    skip = [s for s in args.skip.split(",") if s]
    for name, fn in sections.items():
        if any(name == s or name.startswith(s + "_") for s in skip):
            RESULTS[name] = dict(status="skipped")
            continue
        print(f"\n[{name}] {(fn.func if isinstance(fn, partial) else fn).__doc__.splitlines()[0]}", flush=True)
        res, t0 = {}, time.perf_counter()
        free()
        try:
            fn(args, res)
            RESULTS[name] = dict(status="ok", **res)
        except Exception as e:  # torch.cuda.OutOfMemoryError included: record it, go on with the next section
            traceback.print_exc()
            error = f"{type(e).__name__}: {(str(e).strip() or '?').splitlines()[0][:300]}"
            print(f"  FAILED: {error}", flush=True)
            RESULTS[name] = dict(status="failed", error=error, **res)
        RESULTS[name]["seconds"] = time.perf_counter() - t0
        free()
        write(args.out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen3 and tiny sizes: the script end to end on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    for k, v in SIZES.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), help=f"default {v} (--tiny: {TINY_SIZES[k]})")
    p.add_argument("--rl-timeout", type=int, default=300, help="(4) seconds train_rl.py may take")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 and H200 SXM: 989)")
    p.add_argument("--skip", default="", help="comma list of sections (or prefixes: decode) to leave out")
    p.add_argument("--out", help="the results as JSON, rewritten after every section")
    args = p.parse_args(argv)
    for k, v in (TINY_SIZES if args.tiny else SIZES).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.device, args.cfg = torch.device(args.device), TINY if args.tiny else QWEN3_4B
    args.rows, args.eager_rows = ([int(x) for x in s.split(",") if x] for s in (args.rows, args.eager_rows))
    gpu = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {gpu}; model: {'tiny Qwen3' if args.tiny else 'Qwen3-4B config'}, random weights; "
          f"torch {torch.__version__}; {args.repeats} repeats after a warm-up")
    RESULTS["setup"] = dict(device=gpu, torch=torch.__version__, model=args.cfg,
                            args={k: v for k, v in vars(args).items() if k != "cfg"})
    write(args.out)
    t0 = time.perf_counter()
    run_sections({"equal": equal, **{f"decode_{R}": partial(decode, R=R) for R in args.rows},
                  "grpo_lora": partial(grpo, lora=True), "grpo_full": partial(grpo, lora=False),
                  "train_rl": train_rl}, args)
    RESULTS["setup"]["total_s"] = time.perf_counter() - t0
    write(args.out)
    bad = [k for k, v in RESULTS.items() if v.get("status") == "failed"]
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; " + (f"FAILED: {', '.join(bad)}" if bad else "every section ok"))


if __name__ == "__main__":
    main()
