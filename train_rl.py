"""
Stages 2 and 3 of the curriculum: GRPO with our own loop.

    python train_rl.py --preset toy --stage easy                      # toy, CPU, after train_sft.py --preset toy
    accelerate launch train_rl.py --stage easy                        # GSM8K, reward: correct AND a block
    accelerate launch train_rl.py --stage hard                        # DAPO-Math-17k, reward: accuracy
    accelerate launch --config_file configs/lora_1gpu.yaml train_rl.py --stage hard --lora

Each step reads top to bottom: prompts -> rollouts (the branching sampler,
group_size per prompt) -> rewards -> group advantages -> micro-batched policy
update -> log -> checkpoint. Each stage starts by default from the previous
stage's output dir (out/sft -> out/rl-easy -> out/rl-hard), so the curriculum
chains with no paths typed.

Multi-GPU: every rank samples its own share of the step's prompts (a group never
straddles ranks), advantages are computed per group on the rank, the loss is
normalised by the token count of the whole step across ranks, metrics are reduced.

Simplifications relative to the paper / official code:
1. Rollouts are sampled by our transformers sampler, not vLLM.
2. One policy update per rollout batch by default (the ratio is then exactly 1);
   --ppo-epochs / --mini-batches > 1 recompute old log-probs with the trainer first.
3. Forced (runtime-inserted) tokens carry no loss (official trained on them).
4. Under FSDP the sampler uses a separate inference copy of the model, refreshed
   from the gathered full weights once per rollout phase.
"""

import argparse
import copy
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from nanopr1 import data, format, rewards
from nanopr1.attention import build_inputs
from nanopr1.grpo import group_advantages, policy_loss, token_logprobs
from nanopr1.model import apply_lora, load, resume_step, save_checkpoint, tag_ids
from nanopr1.sampler import ALL_TAGS, sample

STAGES = {  # the paper's settings per stage
    "easy": dict(init="out/sft", out="out/rl-easy", data="gsm8k", reward="parallel", group_size=5,
                 prompts_per_step=1024, steps=35),
    "hard": dict(init="out/rl-easy", out="out/rl-hard", data="dapo", reward="acc", group_size=8,
                 prompts_per_step=512, steps=300),
}
TOY_STAGES = {  # the CPU-sized curriculum
    "easy": dict(init="out/toy-sft", out="out/toy-easy", data="toy:easy", reward="parallel", group_size=8,
                 prompts_per_step=16, steps=35),
    "hard": dict(init="out/toy-easy", out="out/toy-hard", data="toy:hard", reward="acc", group_size=8,
                 prompts_per_step=16, steps=40),
}
TOY = dict(lr=5e-5, max_new_tokens=160, micro_batch=64, eval_data="toy-hard", eval_n=4, eval_limit=100,
           save_every=25)

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--preset", choices=["toy"], help="toy: the CPU-sized world")
p.add_argument("--stage", choices=["easy", "hard"], default="hard", help="easy: GSM8K; hard: DAPO-Math-17k")
# model
p.add_argument("--init", help="checkpoint to start from (default: the previous stage's output dir)")
p.add_argument("--variant", choices=["seen", "unseen"], default="seen", help="unseen: path-isolating attention")
p.add_argument("--lora", action="store_true", help="train LoRA adapters only (one GPU)")
p.add_argument("--lora-r", type=int, default=64)
p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
# data
p.add_argument("--data", help="problems: a short name, a file or a hub id (default: by stage)")
p.add_argument("--data-dir", help="read short dataset names from local files in this dir")
p.add_argument("--prompt-file", help="prompt template with a {problem} slot (default: the parallel prompt)")
# sampling
p.add_argument("--group-size", type=int, help="rollouts per prompt (default: easy 5, hard 8)")
p.add_argument("--num-paths", type=int, default=2)
p.add_argument("--max-blocks", type=int, default=4)
p.add_argument("--max-new-tokens", type=int, default=3000, help="response budget, everything included")
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--top-p", type=float, default=1.0)
# reward
p.add_argument("--reward", choices=rewards.SCHEDULES, help="default: easy parallel, hard acc")
p.add_argument("--scaffold-switch", type=int, default=200, help="scaffold: alternating until this step, then acc")
# optimisation
p.add_argument("--prompts-per-step", type=int, help="prompts per step, all ranks (default: easy 1024, hard 512)")
p.add_argument("--steps", type=int, help="RL steps (default: easy 35, hard 300)")
p.add_argument("--lr", type=float, default=1e-6)
p.add_argument("--weight-decay", type=float, default=0.01)
p.add_argument("--clip-low", type=float, default=0.2)
p.add_argument("--clip-high", type=float, default=0.2, help="0.28 in the S2 (alternating) runs")
p.add_argument("--dual-clip", type=float, default=3.0)
p.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL to the initial model (0: off, the paper)")
p.add_argument("--ppo-epochs", type=int, default=1)
p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per rollout batch and epoch")
p.add_argument("--micro-batch", type=int, default=8, help="rollouts per forward on one rank")
p.add_argument("--seed", type=int, default=0)
# logging, checkpoints, eval
p.add_argument("--out", help="output dir (default: by stage)")
p.add_argument("--save-every", type=int, default=20)
p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
p.add_argument("--eval-every", type=int, default=0, help="run eval on --eval-data every N steps (0: off)")
p.add_argument("--eval-data", default="aime25", help="held-out set for --eval-every")
p.add_argument("--eval-n", type=int, default=4)
p.add_argument("--eval-limit", type=int, default=None, help="only the first N eval problems")

# -----------------------------------------------------------------------------


def load_problems(args):
    if args.data.startswith("toy:"):
        from nanopr1 import toy
        return toy.problems(args.data[4:], 20000, seed=args.seed + 1)
    return data.load(args.data, split="train", data_dir=args.data_dir)


def step_prompts(n_problems, per_step, seed, step):
    """Problem indices of an RL step: a fixed permutation per epoch, so a resumed run
    sees the same prompts as the uninterrupted one."""
    epoch, k = divmod(step * per_step, n_problems)
    order = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return (order + order)[k:k + per_step]  # wraps within the epoch's permutation


def score(model, rollouts, tags, args, pad_id, device):
    """The trainer's log-probs of every response token (B, T) with its loss mask (sampled,
    not forced, not padding); positions and the Unseen mask come from attention.py, and the
    sampler's tag mask is applied so the distribution is the one that was sampled from.
    Logits are computed from the first position that predicts a response token on."""
    batch = build_inputs([r.prompt_ids for r in rollouts], [r.ids for r in rollouts], tags, args.variant, pad_id)
    B, L = batch["input_ids"].shape
    T, first = max(len(r.ids) for r in rollouts), min(len(r.prompt_ids) for r in rollouts) - 1
    start = torch.tensor([len(r.prompt_ids) - 1 - first for r in rollouts])  # (B,) logit row of response token 0
    forced = torch.tensor([r.forced + [True] * (T - len(r.ids)) for r in rollouts])  # (B, T) padding: as forced
    allowed = torch.full((B, L - 1 - first), ALL_TAGS)  # (B, L-1-first) all tags outside responses
    for b, r in enumerate(rollouts):  # forced tokens: no mask (and no loss)
        allowed[b, start[b]:start[b] + len(r.ids)] = torch.tensor(r.allowed).masked_fill(forced[b, :len(r.ids)], ALL_TAGS)
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(**batch, logits_to_keep=L - first).logits[:, :-1]  # (B, L-1-first, V)
    logp = token_logprobs(logits, batch["input_ids"][:, first + 1:], args.temperature, allowed.to(device), tags)
    idx = (start[:, None] + torch.arange(T)).clamp(max=L - 2 - first)  # (B, T)
    return logp.gather(1, idx.to(device)), ~forced.to(device)  # (B, T) response tokens only


def setup(args, acc):
    """The policy (+ LoRA / gradient checkpointing), its optimizer, the frozen reference
    for the KL term (the adapter switched off with LoRA, else a copy of the start) and the
    tokenizer; everything that touches the model is passed through accelerate."""
    if not Path(args.init).exists() and args.preset == "toy":
        raise SystemExit(f"error: no {args.init}: run the previous stage first "
                         f"(`python train_sft.py --preset toy` or `train_rl.py --preset toy --stage easy`)")
    if args.prompts_per_step % acc.num_processes:
        raise SystemExit(f"error: --prompts-per-step {args.prompts_per_step} must divide over "
                         f"{acc.num_processes} processes")
    model, tokenizer = load(args.init)
    if args.lora:
        model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    frozen = None
    if args.kl_coef > 0 and not args.lora:
        frozen = copy.deepcopy(model).to(acc.device).eval().requires_grad_(False)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    model, opt = acc.prepare(model, opt)
    model.train()
    reference = None
    if args.kl_coef > 0:
        reference = (model, acc.unwrap_model(model).disable_adapter) if args.lora else (frozen, nullcontext)
    return model, opt, reference, tokenizer


def main(args):
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    world, rank = acc.num_processes, acc.process_index
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed)
    model, opt, reference, tokenizer = setup(args, acc)
    tags, pad, G = tag_ids(tokenizer), tokenizer.pad_token_id, args.group_size
    template = format.load_template(args.prompt_file) if args.prompt_file else format.PARALLEL_PROMPT
    if args.preset == "toy":
        from nanopr1 import toy
        template = toy.TEMPLATE
    problems = load_problems(args)
    step = resume_step(acc, out, args.resume)
    holder = {}  # the FSDP sampling copy, made on first use
    bar = tqdm(total=args.steps, initial=step, desc=f"rl-{args.stage}", disable=not acc.is_main_process)
    while step < args.steps:
        step += 1
        t0 = time.time()
        # 1) prompts: this rank's share of the step's prompts (whole groups stay on one rank)
        idx = step_prompts(len(problems), args.prompts_per_step, args.seed, step - 1)[rank::world]
        rows = [problems[i] for i in idx]
        prompts = [format.chat_prompt_ids(tokenizer, template, r["question"]) for r in rows]
        # 2) rollouts: the branching sampler, group_size per prompt
        policy = sampling_model(acc, model, holder)
        policy.eval()
        with torch.autocast("cuda", torch.bfloat16) if torch.cuda.is_available() else nullcontext():
            rollouts = sample(policy, tokenizer, prompts, G, num_paths=args.num_paths, max_blocks=args.max_blocks,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed * 100003 + step * world + rank, variant=args.variant)
        policy.train()
        t_rollout = time.time() - t0
        # 3) rewards, 4) group advantages
        scored = [rewards.reward_rollout(r, rows[i // G]["answer"], args.reward, step, args.scaffold_switch)
                  for i, r in enumerate(rollouts)]
        adv, flat = group_advantages([s[0] for s in scored], G)
        # 5) log-probs that stay fixed during the update: old policy (if more than one
        #    optimizer step uses these rollouts; else the ratio is exactly 1) and reference (KL)
        stats = {"clipped_tokens": 0.0, "ratio_sum": 0.0, "tokens": 0.0, "gap_sum": 0.0, "gap_tokens": 0.0, "loss": 0.0}
        old = None
        if args.ppo_epochs > 1 or args.mini_batches > 1:
            old = frozen_logprobs(model, rollouts, tags, args, pad, acc.device)
            stats["gap_sum"] = float(sum((o - torch.tensor(r.logprobs).to(o)).abs()[~torch.tensor(r.forced)].sum()
                                         for o, r in zip(old, rollouts)))
            stats["gap_tokens"] = float(sum(sum(not f for f in r.forced) for r in rollouts))
        ref = None if reference is None else frozen_logprobs(reference[0], rollouts, tags, args, pad, acc.device,
                                                             ctx=reference[1])
        # 6) policy update: mini-batches of the rollouts, each one optimizer step
        for epoch in range(args.ppo_epochs):
            for mb in [list(range(i, len(rollouts), args.mini_batches)) for i in range(args.mini_batches)]:
                update(model, opt, rollouts, mb, adv, old, ref, tags, args, pad, acc, stats)
        stats.pop("gap_done", None)
        # 7) log (reduced over ranks), evaluate, checkpoint
        row = log_row(acc, step, args, rollouts, scored, flat, len(rows), stats, t_rollout, time.time() - t0 - t_rollout)
        if args.eval_every and step % args.eval_every == 0:
            policy = sampling_model(acc, model, holder)  # every rank: a collective under FSDP
            row.update(run_eval(policy, tokenizer, template, args, acc))
        if acc.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}", par=f"{row['parallel_rate']:.2f}")
        bar.update()
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(acc, model, tokenizer, out, args, step)
    bar.close()
    acc.print(f"done: {step} steps, model in {out}")


def log_row(acc, step, args, rollouts, scored, flat, groups, stats, t_rollout, t_update):
    """The step's metrics row: sums reduced over ranks, then divided."""
    m = {k: sum(s[1][k] for s in scored) for k in ("correct", "has_block", "format_ok")}
    m.update(reward=sum(s[0] for s in scored), length=sum(len(r.ids) for r in rollouts), rollouts=len(rollouts),
             flat_groups=flat, groups=groups, **stats)
    m = {k: v.item() for k, v in zip(m, acc.reduce(torch.tensor(list(m.values()), dtype=torch.float64,
                                                                 device=acc.device), "sum"))}
    n = m["rollouts"]
    return {"step": step, "reward": m["reward"] / n, "accuracy": m["correct"] / n,
            "parallel_rate": m["has_block"] / n, "format_ok": m["format_ok"] / n, "length": m["length"] / n,
            "zero_adv_groups": m["flat_groups"] / m["groups"], "clip_frac": m["clipped_tokens"] / max(m["tokens"], 1),
            "ratio": m["ratio_sum"] / max(m["tokens"], 1),
            "logp_gap": m["gap_sum"] / max(m["gap_tokens"], 1), "loss": m["loss"],
            "reward_fn": rewards.reward_fn(args.reward, step, args.scaffold_switch).__name__,
            "rollout_s": t_rollout, "update_s": t_update, "tokens_per_s": m["length"] / max(t_rollout, 1e-9) / acc.num_processes}


@torch.no_grad()
def sampling_model(acc, model, holder):
    """The model the sampler decodes with. Without FSDP it is the training model itself.
    Under FSDP each layer would all-gather its weights at every generated token, so the
    sampler runs a plain bf16 copy instead, refreshed once per rollout phase by gathering
    each full weight one at a time (FSDP2 keeps the parameter names)."""
    from accelerate.utils import DistributedType
    if acc.distributed_type != DistributedType.FSDP:
        return acc.unwrap_model(model)
    if "copy" not in holder:
        from transformers import AutoModelForCausalLM
        config = acc.unwrap_model(model).config
        holder["copy"] = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(acc.device)
    mine = dict(holder["copy"].named_parameters())
    for name, param in acc.unwrap_model(model).named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param  # DTensor shard -> full weight
        mine[name].copy_(full)
    return holder["copy"]


@torch.no_grad()
def frozen_logprobs(model, rollouts, tags, args, pad_id, device, ctx=nullcontext):
    """Per-rollout log-probs that stay fixed during the update: the old policy's (when
    rollouts serve more than one optimizer step) or the reference model's (KL)."""
    out = []
    for i in range(0, len(rollouts), args.micro_batch):
        with ctx():
            logp, _ = score(model, rollouts[i:i + args.micro_batch], tags, args, pad_id, device)
        out += [lp[:len(r.ids)] for lp, r in zip(logp, rollouts[i:i + args.micro_batch])]
    return out


def padded(rows, T, like):
    return torch.stack([torch.nn.functional.pad(torch.as_tensor(r, dtype=torch.float32), (0, T - len(r))) for r in rows]).to(like)


def update(model, opt, rollouts, mb, adv, old, ref, tags, args, pad_id, acc, stats):
    """One optimizer step on the rollouts `mb`: token-mean loss over all ranks' loss tokens."""
    local = sum(sum(not f for f in rollouts[i].forced) for i in mb)
    n_tokens = acc.reduce(torch.tensor(float(local), device=acc.device), "sum").item()
    mb = sorted(mb, key=lambda i: len(rollouts[i].prompt_ids) + len(rollouts[i].ids))  # similar lengths: less padding
    chunks = [mb[i:i + args.micro_batch] for i in range(0, len(mb), args.micro_batch)]
    for j, chunk in enumerate(chunks):
        ros = [rollouts[i] for i in chunk]
        with nullcontext() if j == len(chunks) - 1 else acc.no_sync(model):  # all-reduce once per step
            logp, mask = score(model, ros, tags, args, pad_id, acc.device)
            T = logp.shape[1]
            old_lp = logp.detach() if old is None else padded([old[i] for i in chunk], T, logp)
            ref_lp = None if ref is None else padded([ref[i] for i in chunk], T, logp)
            loss, s = policy_loss(logp, old_lp, adv[chunk].to(logp), mask, n_tokens, args.clip_low, args.clip_high,
                                  args.dual_clip, ref_lp, args.kl_coef)
            acc.backward(loss * acc.num_processes)  # DDP averages over ranks: * world makes it a sum
        for k in ("clipped_tokens", "ratio_sum", "tokens"):
            stats[k] += s[k]
        stats["loss"] += loss.item()
        if old is None and not stats.get("gap_done"):  # on-policy: this forward is the trainer's view
            stats["gap_sum"] += float(((logp.detach() - padded([r.logprobs for r in ros], T, logp)).abs() * mask).sum())
            stats["gap_tokens"] += float(mask.sum())
    stats["gap_done"] = True
    acc.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_eval(model, tokenizer, template, args, acc):
    """The --eval-every hook: each rank evaluates its share of a held-out set; the rows are
    gathered and every rank returns the same summary (the main one logs it)."""
    from accelerate.utils import gather_object

    from nanopr1.evaluation import evaluate, merge, summarize
    problems = data.load(args.eval_data, split="test", data_dir=args.data_dir)[:args.eval_limit]
    rows, _ = evaluate(model, tokenizer, problems, args.eval_n, template=template, progress=False,
                       max_new_tokens=args.max_new_tokens, num_paths=args.num_paths, max_blocks=args.max_blocks,
                       variant=args.variant, seed=args.seed, rank=acc.process_index, world=acc.num_processes)
    summary = summarize(merge([gather_object(rows)]), args.eval_n)
    return {f"eval_{k}": v for k, v in summary.items() if isinstance(v, (int, float))}


def parse_args(argv=None):
    args = p.parse_args(argv)
    if args.preset == "toy":
        p.set_defaults(**TOY)
        args = p.parse_args(argv)
    for k, v in (TOY_STAGES if args.preset == "toy" else STAGES)[args.stage].items():
        if getattr(args, k) is None:  # the stage's defaults fill whatever was not given
            setattr(args, k, v)
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
