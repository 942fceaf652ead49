"""
bench/bench_4b.py: nanopr1 at Qwen3-4B scale on one GPU, in one run. A benchmark, not a test.

    python bench/bench_4b.py --tiny                       # CPU, a tiny Qwen3: the script end to end, in seconds
    python bench/bench_4b.py --out bench_4b.json          # one H100 / H200: Qwen3-4B-shaped, random bf16 weights

The model is built from the Qwen3-4B config with random weights (nothing is downloaded; speed and memory
do not depend on the weights) and a stand-in tokenizer that only knows the ids of the six tags. EOS is
switched off so every rollout runs to its budget. What it prints:
  (0) fast sampler == simple sampler at temperature 0 on this device: a tiny fp32 model (tokens identical,
      log-prob difference) and the big bf16 model (share of identical tokens, log-prob difference);
  (1) decode tokens/s of the fast sampler vs the simple sampler vs model.generate, greedy, parallel off,
      batch 1, 64, 256, prompt 512, 1,024 new tokens (prefill included), plus 2-path blocks at batch 64;
  (2) the bandwidth floor of each batch (weight bytes + KV bytes read per step / measured copy bandwidth)
      and the share of it the fast sampler's decode reaches (its prefill timed apart and subtracted);
  (3) one GRPO step (scoring.score + grpo.policy_loss, gradient checkpointing, bf16 autocast): LoRA, and the
      full fine-tune with AdamW (fp32 master weights, as train_rl) if it fits: peak memory, time, tokens/s, MFU;
  (4) SFT tokens/s (scoring.sequence_nll), same setting as the largest GRPO step that fitted;
  (5) the Unseen mask, attention forward+backward: sdpa with the dense bool mask vs flex attention with a
      block mask built from the same block structure (flex has no backward on a CPU);
  (6) the memory plan's estimate (nanopr1/plan.py) of the step of (3) next to its measured peak.
MFU = 6 * parameters * tokens / time / peak (--peak-tflops, 989 for H100/H200 bf16 dense); with gradient
checkpointing the real work is ~8 * N per token, with LoRA ~4 * N (no weight gradients).
"""

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from nanopr1.attention import find_blocks, unseen_mask
from nanopr1.format import PARALLEL, PARALLEL_END, PATH, PATH_END, SUMMARY, SUMMARY_END, TAGS
from nanopr1.grpo import policy_loss
from nanopr1.model import apply_lora
from nanopr1.rollout import Rollout
from nanopr1.sampler import sample
from nanopr1.scoring import collate, score, sequence_nll
from nanopr1.staticcache import StaticRows

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000, tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)
RESULTS = {}


class IdTokenizer:
    """What the sampler needs from a tokenizer: the tag ids (Qwen3's 151669.. for the 4B model), no EOS."""

    def __init__(self, vocab_size):
        first = 151669 if vocab_size == 151936 else vocab_size - len(TAGS)
        self.vocab = {t: first + i for i, t in enumerate(TAGS)}
        self.eos_token_id, self.pad_token_id, self.n = None, 0, vocab_size

    def get_vocab(self):
        return dict(self.vocab)

    def decode(self, ids, **kw):
        return " ".join(map(str, ids))

    def __len__(self):
        return self.n


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def report(key, text, **values):
    print(text, flush=True)
    RESULTS[key] = values


def build(cfg, dtype, device):
    with torch.device(device):  # random init directly on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(Qwen3Config(**cfg), dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.eval()


def prompts(n, length, tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(tok.vocab.values()), (n, length), generator=g).tolist()

# -----------------------------------------------------------------------------
# (0)-(2) the sampler


CACHES = []  # the static caches made, to report whether CUDA graph capture worked


def static(model, rows, cols):
    CACHES.append(StaticRows(rows, cols, next(model.parameters()).device))
    return CACHES[-1]


def equivalence(model, tok, label, n, new):
    """Fast vs simple at temperature 0: parallel off, and forced 2-path blocks in both variants."""
    for name, kw in [("parallel off", dict(parallel=False)), ("seen blocks", dict(variant="seen", force_block=8)),
                     ("unseen blocks", dict(variant="unseen", force_block=8))]:
        ps = prompts(n, 24, tok, seed=1)
        a = sample(model, tok, ps, 2, max_new_tokens=new, temperature=0, path_max_tokens=12, **kw)
        b = sample(model, tok, ps, 2, max_new_tokens=new, temperature=0, path_max_tokens=12,
                   cache=static(model, 16, 24 + new + 2), **kw)
        same = sum(x == y for r, q in zip(a, b) for x, y in zip(r.ids, q.ids)) / sum(len(r.ids) for r in a)
        prefix = [next((i for i, (x, y) in enumerate(zip(r.ids, q.ids)) if x != y), len(r.ids)) for r, q in zip(a, b)]
        diff = max(abs(x - y) for r, q, k in zip(a, b, prefix) for x, y in zip(r.logprobs[:k], q.logprobs[:k]))
        report(f"equal/{label}/{name}", f"  {label:14s} {name:14s}: identical tokens {same:7.2%}   max |log-prob "
               f"difference| until the first different token {diff:.2e}   blocks {sum(len(r.blocks) for r in a)}",
               identical=same, max_logprob_diff=diff)


def bandwidth(device):
    n = (1 << 30) if device == "cuda" else (1 << 26)
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    b.copy_(a)
    _, t = timed(lambda: [b.copy_(a) for _ in range(10)])
    return 2 * n * 10 / t  # bytes read + written per second


def decode_bench(model, tok, args, bw):
    cfg, P, N = model.config, args.prompt, args.new_tokens
    W = sum(p.numel() * p.element_size() for p in model.parameters())  # weight bytes read per step
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * next(model.parameters()).element_size()
    print(f"\n(1, 2) decode, greedy, prompt {P}, {N} new tokens; weights {W / 1e9:.2f} GB, KV {kv_token / 1e3:.1f} "
          f"kB/token, copy bandwidth {bw / 1e9:.0f} GB/s")
    for B in args.batches:
        ps, row = prompts(B, P, tok), {}
        run = lambda fast, n=N: sample(model, tok, ps, 1, max_new_tokens=n, temperature=0, parallel=False,
                                       cache=static(model, B, P + N + 2) if fast else None)
        for name, fn in [("fast", lambda: run(True)), ("simple", lambda: run(False)), ("generate", lambda: generate(model, ps, N))]:
            if name in args.methods:
                try:
                    out, t = timed(fn)
                    row[name] = (out if name == "generate" else sum(len(r.ids) for r in out)) / t
                except torch.cuda.OutOfMemoryError:
                    row[name] = float("nan")
                free()
        _, t_prefill = timed(lambda: run(True, 1))  # prefill + one sampled token, no decode step
        floor = N * (W + B * (P + N / 2) * kv_token) / bw  # the decode steps at the bandwidth floor (mean context)
        decode = B * N / row.get("fast", float("nan")) - t_prefill  # the fast sampler's decode alone
        text = "   ".join(f"{k} {v:9.1f} tok/s" for k, v in row.items())
        if "fast" in row and "generate" in row:
            text += f"   fast/generate {row['fast'] / row['generate']:5.2f}x"
        report(f"decode/{B}", f"  batch {B:4d}: {text}\n              decode only: floor {B * N / floor:9.1f} tok/s, "
               f"fast {B * N / decode:9.1f} tok/s = {floor / decode:6.1%} of the floor (prefill {t_prefill:.2f} s)",
               tokens_per_s=row, prefill_s=t_prefill, floor_tokens_per_s=B * N / floor, share_of_floor=floor / decode)
    B = args.batches[min(1, len(args.batches) - 1)]
    ps, row = prompts(B, P, tok), {}
    for name in ("fast", "simple"):
        out, t = timed(lambda: sample(model, tok, ps, 1, max_new_tokens=N, temperature=0, variant="unseen",
                                      force_block=32, cache=static(model, 2 * B, P + N + 2) if name == "fast" else None))
        row[name], blocks = sum(len(r.ids) for r in out) / t, sum(len(r.blocks) for r in out)
        free()
    report("decode/paths", f"  batch {B:4d}, 2-path blocks (unseen, {blocks} blocks): fast {row['fast']:9.1f} tok/s   "
           f"simple {row['simple']:9.1f} tok/s   ratio {row['fast'] / row['simple']:5.2f}x", tokens_per_s=row, blocks=blocks)


@torch.inference_mode()
def generate(model, ps, N):
    ids = torch.tensor(ps, device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                         min_new_tokens=N, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].numel()

# -----------------------------------------------------------------------------
# (3)-(4) training steps


def rollout(tok, P, N, g):
    """A synthetic rollout with one 2-path block: prompt P tokens, response N tokens, tags forced."""
    t, k = tok.vocab, N // 4
    words = lambda n: torch.randint(10, min(t.values()), (n,), generator=g).tolist()
    ids = ([t[PARALLEL], t[PATH]] + words(k) + [t[PATH_END], t[PATH]] + words(k) + [t[PATH_END], t[PARALLEL_END],
           t[SUMMARY]] + words(8) + [t[SUMMARY_END]])
    ids += words(N - len(ids))
    forced = [i in t.values() for i in ids]
    return Rollout(words(P), ids, forced, [0.0] * N, list(range(P, P + N)), [(1 << len(TAGS)) - 1] * N,
                   find_blocks(ids, t), "", "budget")


def grpo_step(model, opt, rollouts, tags, micro, device):
    n_tokens = sum(sum(not f for f in r.forced) for r in rollouts)
    adv = torch.randn(len(rollouts))
    for i in range(0, len(rollouts), micro):
        with autocast(device):
            logp, mask = score(model, rollouts[i:i + micro], tags, "seen", 1.0, 0, device)
            loss, _ = policy_loss(logp, logp.detach() + 0.01, adv[i:i + micro].to(logp), mask, n_tokens)
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def sft_step(model, opt, rollouts, tags, micro, device):
    for i in range(0, len(rollouts), micro):
        examples = [(r.prompt_ids, r.ids) for r in rollouts[i:i + micro]]
        batch, targets, mask = collate(examples, tags, "seen", 0)
        with autocast(device):
            nll = sequence_nll(model, {k: v.to(device) for k, v in batch.items()}, targets.to(device),
                                         mask.to(device)).sum() / mask.sum()
        nll.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def autocast(device):
    return torch.autocast(device, torch.bfloat16, enabled=device == "cuda")


def train_bench(cfg, tok, args, device):
    g = torch.Generator().manual_seed(0)
    rollouts = [rollout(tok, args.prompt, args.new_tokens, g) for _ in range(args.grpo_rollouts)]
    tokens = sum(len(r.prompt_ids) + len(r.ids) for r in rollouts)
    print(f"\n(3, 4) training steps: {len(rollouts)} rollouts of {args.prompt}+{args.new_tokens} tokens, micro-batch "
          f"{args.micro_batch}, gradient checkpointing, bf16 autocast on CUDA; best of {args.repeats} after a warm-up")
    fitted, n_params = {}, 0
    for mode in ("lora", "full"):
        free()
        try:
            model = build(cfg, torch.bfloat16 if mode == "lora" else torch.float32, device)
            n_params = sum(p.numel() for p in model.parameters())
            if mode == "lora":
                model = apply_lora(model, r=64, alpha=128, train_tokens=list(tok.vocab.values()))
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
            for kind, step in (("grpo", grpo_step), ("sft", sft_step)):
                step(model, opt, rollouts, tok.vocab, args.micro_batch, device)  # warm-up (optimizer states too)
                free()
                t = min(timed(lambda: step(model, opt, rollouts, tok.vocab, args.micro_batch, device))[1]
                        for _ in range(args.repeats))
                peak = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
                mfu = 6 * n_params * tokens / t / (args.peak_tflops * 1e12) if device == "cuda" else float("nan")
                report(f"{kind}/{mode}", f"  {kind.upper():4s} {mode:4s}: step {t:7.2f} s   {tokens / t:9.0f} tok/s   "
                       f"peak {peak / 2**30:6.1f} GiB   MFU {mfu:6.1%}", step_s=t, tokens_per_s=tokens / t,
                       peak_gib=peak / 2**30, mfu=mfu)
                fitted[f"{kind}/{mode}"] = peak
        except torch.cuda.OutOfMemoryError as e:
            report(f"grpo/{mode}", f"  {mode}: does not fit on this GPU ({str(e).splitlines()[0][:120]})", oom=True)
        model = opt = None
    return fitted, n_params


def plan_check(cfg, fitted, args):
    """(6) nanopr1/plan.py's estimate of the same GRPO step next to the measured peak: the plan's
    activation figure is an estimate, this is where it is checked."""
    from nanopr1.plan import memory_plan
    T = args.micro_batch * (args.prompt + args.new_tokens)
    print(f"\n(6) the memory plan vs the measured GRPO step (micro-batch of {T:,} tokens, one GPU, no sampling):")
    for mode in ("lora", "full"):
        peak = fitted.get(f"grpo/{mode}", float("nan"))
        if peak != peak:
            continue
        plan = memory_plan(Qwen3Config(**cfg), gpu_bytes=1e15, lora_r=64 if mode == "lora" else 0,
                           micro_batch_tokens=T, sampling=False)
        estimate = sum(b for what, b in plan.items if not what.startswith("CUDA context"))  # as allocated
        report(f"plan/{mode}", f"  {mode}: measured peak {peak / 1e9:6.1f} GB, plan {estimate / 1e9:6.1f} GB "
               f"({estimate / peak:5.0%})", measured_gb=peak / 1e9, plan_gb=estimate / 1e9)

# -----------------------------------------------------------------------------
# (5) Unseen attention: sdpa vs flex


def structure(rollouts, T):
    """Per token: the path it belongs to (-1: none) and that path's block (-1: none); the valid length."""
    path = torch.full((len(rollouts), T), -1)
    block = torch.full((len(rollouts), T), -1)
    for b, r in enumerate(rollouts):
        P = len(r.prompt_ids)
        for i, blk in enumerate(r.blocks):
            for k, (s, e) in enumerate(blk.paths):
                path[b, P + s:P + e], block[b, P + s:P + e] = 100 * i + k, i
    return path, block, torch.tensor([len(r.prompt_ids) + len(r.ids) for r in rollouts])


def attention_bench(cfg, tok, args, device):
    from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention
    g = torch.Generator().manual_seed(1)
    T = args.prompt + args.new_tokens
    rollouts = [rollout(tok, args.prompt, args.new_tokens - 4 * b, g) for b in range(args.micro_batch)]
    dense = torch.stack([unseen_mask(len(r.prompt_ids), len(r.ids), r.blocks, T) for r in rollouts]).to(device)
    path, block, n = (x.to(device) for x in structure(rollouts, T))

    def unseen(b, h, q, kv):  # attention.py's rule, from the block structure: causal, pads hidden, no sibling paths
        sibling = (block[b, q] >= 0) & (block[b, q] == block[b, kv]) & (path[b, q] != path[b, kv])
        return (kv <= q) & ((kv < n[b]) | (kv == q)) & ~sibling

    same_mask = bool((create_mask(unseen, len(rollouts), 1, T, T, device=device)[:, 0] == dense).all())
    bm = create_block_mask(unseen, len(rollouts), None, T, T, device=device)
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grad = device == "cuda"  # flex attention has no backward on a CPU
    q = torch.randn(len(rollouts), H, T, D, device=device, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(len(rollouts), Hkv, T, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))
    flex = torch.compile(flex_attention) if device == "cuda" else flex_attention

    def sdpa():  # as transformers in training: K/V heads repeated, the dense bool mask
        rep = lambda x: x.repeat_interleave(H // Hkv, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=dense[:, None])

    out = {}
    for name, fn in (("sdpa", sdpa), ("flex", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))):
        def run():
            o = fn()
            if grad:
                o.backward(torch.ones_like(o))
            return o.detach()
        run()  # warm-up (compiles flex)
        free()
        o, t = min((timed(run) for _ in range(args.repeats)), key=lambda x: x[1])
        out[name] = (o, t, torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"))
    diff = (out["sdpa"][0].float() - out["flex"][0].float()).abs().max().item()
    report("attention", f"\n(5) Unseen attention {'forward+backward' if grad else 'forward only (CPU)'}, batch "
           f"{len(rollouts)} x {T} tokens, {H}/{Hkv} heads: sdpa {out['sdpa'][1] * 1e3:8.2f} ms (peak "
           f"{out['sdpa'][2]:.1f} GiB)   flex {out['flex'][1] * 1e3:8.2f} ms (peak {out['flex'][2]:.1f} GiB)   "
           f"flex mask == attention.unseen_mask: {same_mask}   max |output difference| {diff:.1e}",
           sdpa_ms=out["sdpa"][1] * 1e3, flex_ms=out["flex"][1] * 1e3, same_mask=same_mask, max_diff=diff)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen3 and small sizes: checks the script on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,64,256", help="(1) decode batch sizes")
    p.add_argument("--methods", default="fast,simple,generate", help="(1) which decoders")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--grpo-rollouts", type=int, default=8, help="(3, 4) rollouts per training step")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 and H200 SXM: 989)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: equal,decode,train,attention")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.tiny:
        args.batches, args.prompt, args.new_tokens, args.grpo_rollouts = "1,4,8", 32, 48, 4
    args.batches, args.methods = [int(b) for b in args.batches.split(",")], args.methods.split(",")
    cfg, device, skip = TINY if args.tiny else QWEN3_4B, args.device, args.skip.split(",")
    tok = IdTokenizer(cfg["vocab_size"])
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {gpu}; model: {'tiny Qwen3' if args.tiny else 'Qwen3-4B config'}, random weights; "
          f"torch {torch.__version__}")
    RESULTS["setup"] = dict(device=gpu, tiny=args.tiny, args=vars(args))
    t0 = time.time()
    if "equal" not in skip:
        print("\n(0) fast sampler vs simple sampler, temperature 0, 2 rollouts x 4 prompts, 40 new tokens; "
              f"CUDA graphs: {'on' if device == 'cuda' else 'off (CPU)'}")
        equivalence(build(TINY, torch.float32, device), IdTokenizer(TINY["vocab_size"]), "tiny fp32", 4, 40)
    big = build(cfg, torch.bfloat16 if device == "cuda" else torch.float32, device) if {"equal", "decode"} - set(skip) else None
    if "equal" not in skip:
        equivalence(big, tok, "model " + str(next(big.parameters()).dtype)[6:], 4, 40)
    if "decode" not in skip:
        decode_bench(big, tok, args, bandwidth(device))
    errors = {c.graph_error for c in CACHES if c.graph_error}
    print(f"  CUDA graph capture: {'; '.join(errors) or 'ok'}" if device == "cuda" else "", end="")
    CACHES.clear()
    big = None
    free()
    if "train" not in skip:
        plan_check(cfg, train_bench(cfg, tok, args, device)[0], args)
    if "attention" not in skip:
        attention_bench(cfg, tok, args, device)
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
