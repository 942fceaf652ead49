"""
Stages 2 and 3 of the curriculum: GRPO with our own loop.

    python train_rl.py --preset toy --stage easy                      # toy, CPU, after train_sft.py --preset toy
    accelerate launch --config_file configs/fsdp_8gpu.yaml train_rl.py --stage easy    # GSM8K, correct AND a block
    accelerate launch --config_file configs/fsdp_8gpu.yaml train_rl.py --stage hard    # DAPO-Math-17k, accuracy
    accelerate launch --config_file configs/lora_1gpu.yaml train_rl.py --stage hard --lora
    python train_rl.py --plan --init DIR --num-gpus 8 --gpu-memory-gb 80   # will it fit? (DIR: a config.json)

Each step reads top to bottom: prompts -> rollouts (the branching sampler,
group_size per prompt) -> rewards -> group advantages -> log-probs -> clipped
loss -> backward -> optimizer step -> log -> checkpoint. Each stage starts by
default from the previous stage's output dir, so the curriculum chains with no
paths typed. The defaults of each (stage, variant) are the paper's recipes
(nanopr1/recipes.py; `--help` prints the table); explicit flags win.

Memory (see nanopr1/plan.py): rollouts are sampled from a bf16 copy of the model
refreshed once per rollout phase, with a KV cache of a fixed number of rows
allocated once (on a GPU: what the plan leaves, or --kv-memory-gb); log-probs
never hold full-vocabulary logits; micro-batches hold --micro-batch-tokens.

Multi-GPU: every rank samples its own share of the step's prompts (a group never
straddles ranks), advantages are computed per group on the rank, the loss is
normalised by the token count of the whole step across ranks, metrics are reduced.

Simplifications relative to the paper / official code:
1. Rollouts are sampled by our transformers sampler, not vLLM.
2. One policy update per rollout batch by default (the ratio is then exactly 1);
   --ppo-epochs / --mini-batches > 1 recompute old log-probs with the trainer first.
3. Forced (runtime-inserted) tokens carry no loss (official trained on them).
"""

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm import tqdm

from nanopr1 import UsageError, checkpoint, data, format, metrics, recipes, rewards
from nanopr1.grpo import group_advantages, policy_loss
from nanopr1.model import apply_lora, load, refresh_copy, sampling_copy, tag_ids
from nanopr1.rollout import mix
from nanopr1.sampler import sample
from nanopr1.scoring import micro_batches, pad_rows, sampler_gap, score

SAME = ("script", "stage", "variant", "data", "init", "prompts_per_step", "group_size", "num_paths", "reward",
        "max_new_tokens", "lora", "lora_r", "seed")  # what --resume refuses to change
MAY_CHANGE = ("lr", "steps", "save_every", "eval_every", "eval_data", "eval_n", "eval_limit", "micro_batch_tokens",
              "kv_memory_gb", "max_rows")  # what it applies, and says so
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="\n\n".join(recipes.__doc__.split("\n\n")[2:4]))
p.add_argument("--preset", choices=["toy"], help="toy: the CPU-sized world")
p.add_argument("--stage", choices=["easy", "hard"], default="hard", help="easy: GSM8K; hard: DAPO-Math-17k")
# model
p.add_argument("--init", help="checkpoint to start from (default: by stage and variant)")
p.add_argument("--variant", choices=["seen", "unseen"], default="seen", help="unseen: path-isolating attention")
p.add_argument("--lora", action="store_true", help="train LoRA adapters only (one GPU)")
p.add_argument("--lora-r", type=int, default=64)
p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, help="gradient checkpointing (default: on a GPU)")
# data
p.add_argument("--data", help="problems: a short name, a file or a hub id (default: by stage)")
p.add_argument("--data-dir", help="read short dataset names from local files in this dir")
p.add_argument("--prompt-file", help="prompt template with a {problem} slot (default: the parallel prompt)")
p.add_argument("--max-prompt-tokens", type=int, default=2000, help="longer prompts are left out (counted)")
# sampling
p.add_argument("--group-size", type=int, help="rollouts per prompt (default: by stage)")
p.add_argument("--num-paths", type=int, default=2)
p.add_argument("--max-blocks", type=int, default=4)
p.add_argument("--max-new-tokens", type=int, default=3000, help="response budget, everything included")
p.add_argument("--answer-reserve", type=int, help="tokens a block leaves for its summary and the answer "
               "(default: min(64, max-new-tokens / 8), the 3,000-token budget keeps 64)")
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--top-p", type=float, default=1.0)
p.add_argument("--kv-memory-gb", type=float, help="GPU: the KV cache's size (default: what the memory plan leaves)")
p.add_argument("--max-rows", type=int, help="cap on KV cache rows in flight (default: from the KV memory on a GPU, "
               "unbounded on a CPU)")
# reward
p.add_argument("--reward", choices=rewards.SCHEDULES, help="default: by stage and variant")
p.add_argument("--scaffold-switch", type=int, default=200, help="scaffold: alternating until this step, then acc")
# optimisation
p.add_argument("--prompts-per-step", type=int, help="prompts per step, all ranks (default: by stage)")
p.add_argument("--steps", type=int, help="RL steps (default: by stage)")
p.add_argument("--lr", type=float, default=1e-6)
p.add_argument("--weight-decay", type=float, default=0.01)
p.add_argument("--clip-low", type=float, default=0.2)
p.add_argument("--clip-high", type=float, help="default: 0.2, or 0.28 with the Unseen (S2) recipe")
p.add_argument("--dual-clip", type=float, default=3.0)
p.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL to the initial model (0: off, the paper)")
p.add_argument("--ppo-epochs", type=int, default=1)
p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per rollout batch and epoch")
p.add_argument("--micro-batch-tokens", type=int, default=16384, help="rows x padded length of one forward")
p.add_argument("--seed", type=int, default=0)
# memory plan
p.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit (needs only a config.json)")
p.add_argument("--gpu-memory-gb", type=float, help="for the plan: memory of one GPU (default: this device's)")
p.add_argument("--num-gpus", type=int, help="for the plan: GPUs of the run (default: this launch's processes)")
# logging, checkpoints, eval
p.add_argument("--out", help="output dir (default: by stage and variant)")
p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none",
               help="also log metrics.jsonl's rows to a tracker (through accelerate; tensorboard: OUT/trackers)")
p.add_argument("--save-every", type=int, default=20)
p.add_argument("--resume", action="store_true", help=f"continue the run in --out (may change: {', '.join(MAY_CHANGE)})")
p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
p.add_argument("--eval-every", type=int, default=0, help="run eval on --eval-data every N steps (0: off)")
p.add_argument("--eval-data", default="aime25", help="held-out set for --eval-every")
p.add_argument("--eval-n", type=int, default=4)
p.add_argument("--eval-limit", type=int, default=None, help="only the first N eval problems")

# -----------------------------------------------------------------------------


def main(args):
    cuda = torch.cuda.is_available()
    acc = Accelerator(mixed_precision="bf16" if cuda else "no", project_dir=args.out,
                      log_with=None if args.report_to == "none" else args.report_to)
    world, rank, G = acc.num_processes, acc.process_index, args.group_size
    acc.print(f"{world} process{'es' if world > 1 else ''} ({acc.device}, {acc.distributed_type.value})")
    torch.manual_seed(args.seed)
    template = recipes.template(args)
    out = Path(args.out)
    saved, note = checkpoint.prepare_out(out, args, acc, args.resume, args.overwrite, SAME, MAY_CHANGE)
    acc.print(note) if note else None
    problems = data.training_problems(args.data, args.seed + 1, args.data_dir)
    if args.prompts_per_step > len(problems) or args.prompts_per_step % world:
        raise UsageError(f"--prompts-per-step {args.prompts_per_step}: more than the {len(problems)} problems of "
                         f"{args.data}, a step would repeat prompts" if args.prompts_per_step > len(problems) else
                         f"--prompts-per-step {args.prompts_per_step} must divide over {world} processes")
    model, tokenizer = load(args.init, "bfloat16" if cuda and args.lora else "float32")  # LoRA: a frozen bf16 base
    prompts = [format.chat_prompt_ids(tokenizer, template, r["question"]) for r in problems]
    keep = [i for i, q in enumerate(prompts) if len(q) <= args.max_prompt_tokens]  # longer ones are left out
    if len(keep) < len(prompts):
        acc.print(f"{len(prompts) - len(keep)} prompts are longer than --max-prompt-tokens: left out")
    if len(keep) < args.prompts_per_step:
        raise UsageError(f"only {len(keep)} prompts fit --max-prompt-tokens {args.max_prompt_tokens}")
    problems, prompts = [problems[i] for i in keep], [prompts[i] for i in keep]
    model, opt, reference, policy, kv = setup(model, args, acc, max(map(len, prompts)))
    tags, pad = tag_ids(tokenizer), tokenizer.pad_token_id
    sampling = dict(num_paths=args.num_paths, max_blocks=args.max_blocks, max_new_tokens=args.max_new_tokens,
                    reserve=args.answer_reserve, temperature=args.temperature, top_p=args.top_p,
                    variant=args.variant, max_rows=args.max_rows)
    out.mkdir(parents=True, exist_ok=True)
    step = 0
    if saved is not None:  # --resume: model, optimizer and RNG as saved; the data position is the step
        step, _ = checkpoint.load_state(out, acc)
        checkpoint.apply_lr(opt, args.lr)
    checkpoint.start_trackers(acc, args)
    bar = tqdm(total=args.steps, initial=step, desc=f"rl-{args.stage}", disable=not acc.is_main_process)
    while step < args.steps:
        step += 1
        t0 = time.time()
        # 1) prompts: this rank's share of the step's prompts (whole groups stay on one rank)
        idx = data.step_problems(len(problems), args.prompts_per_step, args.seed, step - 1)[rank::world]
        rows = [problems[i] for i in idx]
        # 2) rollouts: the branching sampler on the sampling copy, refreshed from the trained weights
        refresh_copy(policy, acc.unwrap_model(model))  # every rank: a collective under FSDP
        rollouts = sample(policy, tokenizer, [prompts[i] for i in idx], G, cache=kv,
                          seed=[mix(args.seed, step, i) for i in idx], **sampling)
        t_rollout = time.time() - t0
        # 3) rewards, 4) group advantages
        graded = [rewards.reward_rollout(r, rows[i // G]["answer"], args.reward, step, args.scaffold_switch)
                  for i, r in enumerate(rollouts)]
        adv, zero_groups = group_advantages([g[0] for g in graded], G)
        # 5) log-probs that stay fixed during the update: the old policy's (if more than one optimizer
        #    step uses these rollouts; else the ratio is exactly 1) and the reference's (KL)
        old = logprobs(model, rollouts, tags, pad, args, acc) if args.ppo_epochs > 1 or args.mini_batches > 1 else None
        ref = None if reference is None else logprobs(reference[0], rollouts, tags, pad, args, acc, reference[1])
        # 6) policy update: per mini-batch one optimizer step, micro-batches of at most --micro-batch-tokens
        stats = dict(clipped_tokens=0.0, ratio_sum=0.0, tokens=0.0, gap_sum=0.0, gap_tokens=0.0, loss=0.0)
        for epoch in range(args.ppo_epochs):
            for mb in [list(range(i, len(rollouts), args.mini_batches)) for i in range(args.mini_batches)]:
                n_tokens = acc.reduce(torch.tensor(float(sum(sum(not f for f in rollouts[i].forced) for i in mb)),
                                                   device=acc.device), "sum").item()  # loss tokens, all ranks
                chunks = even_micro_batches(acc, [len(rollouts[i].prompt_ids) + len(rollouts[i].ids) for i in mb],
                                            args.micro_batch_tokens)
                for j, chunk in enumerate(chunks):
                    ids = [mb[k] for k in chunk] or [mb[0]]  # an empty chunk (FSDP: ranks run as many): zero weight
                    with sync_gradients(acc, model, last=j == len(chunks) - 1):
                        logp, mask = score(model, [rollouts[i] for i in ids], tags, args.variant, args.temperature,
                                           pad, acc.device)  # (B, T) trainer log-probs, loss mask
                        old_lp = logp.detach() if old is None else pad_rows([old[i] for i in ids], logp)
                        ref_lp = None if ref is None else pad_rows([ref[i] for i in ids], logp)
                        mask = mask if chunk else torch.zeros_like(mask)
                        loss, s = policy_loss(logp, old_lp, adv[ids].to(logp), mask, n_tokens,
                                              args.clip_low, args.clip_high, args.dual_clip, ref_lp, args.kl_coef)
                        acc.backward(loss * world)  # DDP averages over ranks: * world makes it a sum
                    for k in ("clipped_tokens", "ratio_sum", "tokens"):
                        stats[k] += s[k]
                    stats["loss"] += loss.item()
                    if epoch == 0 and old is None and chunk:  # on-policy: this forward is the trainer's view
                        gap = sampler_gap(logp.detach(), [rollouts[i] for i in ids])
                        stats["gap_sum"], stats["gap_tokens"] = stats["gap_sum"] + gap[0], stats["gap_tokens"] + gap[1]
                acc.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        if old is not None:  # the old policy's forward was the trainer's view of the rollouts
            stats["gap_sum"], stats["gap_tokens"] = sampler_gap(old, rollouts)
        # 7) log (reduced over ranks), evaluate, checkpoint
        row = log_row(acc, step, args, rollouts, graded, zero_groups, len(rows), stats, t0, t_rollout)
        if args.eval_every and step % args.eval_every == 0:
            refresh_copy(policy, acc.unwrap_model(model))
            row.update(run_eval(policy, tokenizer, template, args, acc))
        checkpoint.log_metrics(acc, out, row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}", par=f"{row['parallel_rate']:.2f}")
        bar.update()
        if step % args.save_every == 0 or step == args.steps:  # every rank (FSDP gathers); the previous survives a kill
            checkpoint.save_run(out, step, acc, model, tokenizer, args)
    bar.close()
    acc.end_training()
    acc.print(f"done: {step} steps, model in {out}")

# -----------------------------------------------------------------------------
# the pieces main() calls


def setup(model, args, acc, longest_prompt):
    """The policy (+ LoRA / gradient checkpointing) and its optimizer through accelerate; the frozen reference
    for the KL term (LoRA: the adapter switched off; else a copy of the start); the sampling copy and, on a
    GPU, the KV cache sized by the memory plan."""
    cuda = torch.cuda.is_available()
    if args.lora:
        model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r)
    if args.grad_ckpt or args.grad_ckpt is None and cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dtype = torch.bfloat16 if cuda else torch.float32
    frozen = None
    if args.kl_coef > 0 and not args.lora:
        frozen = sampling_copy(model, dtype, acc.device)
        refresh_copy(frozen, model)
    trained = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    model, opt = acc.prepare(model, opt)
    model.train()
    reference = None
    if args.kl_coef > 0:
        reference = (model, acc.unwrap_model(model).disable_adapter) if args.lora else (frozen, nullcontext)
    policy = sampling_copy(acc.unwrap_model(model), dtype, acc.device)
    kv = None
    if cuda:  # one static cache for the whole run, sized by the plan (or --kv-memory-gb)
        from nanopr1.plan import plan_for
        from nanopr1.staticcache import StaticRows
        plan = plan_for(args, acc.unwrap_model(model).config, longest_prompt=longest_prompt)
        acc.print(f"memory plan per GPU:\n{plan}")
        if not plan.fits:
            raise UsageError(plan.verdict)
        kv = StaticRows(min(plan.rows, args.max_rows or plan.rows), plan.cols, acc.device)
    return model, opt, reference, policy, kv


def even_micro_batches(acc, lengths, max_tokens):
    """scoring.micro_batches, padded with empty ones so that every rank runs as many forwards: under FSDP
    each forward and backward is a collective."""
    chunks = micro_batches(lengths, max_tokens)
    n = int(acc.reduce(torch.tensor(len(chunks), device=acc.device), "max").item())
    return chunks + [[]] * (n - len(chunks))


def sync_gradients(acc, model, last):
    """DDP: all-reduce once per optimizer step (on the last micro-batch). FSDP: reduce-scatter every
    micro-batch into the sharded gradient, never accumulate an unsharded one (8 GB at 4B)."""
    return nullcontext() if last or acc.distributed_type == DistributedType.FSDP else acc.no_sync(model)


@torch.no_grad()
def logprobs(model, rollouts, tags, pad, args, acc, ctx=nullcontext):
    """Per-rollout log-probs that stay fixed during the update: the old policy's (when rollouts serve more
    than one optimizer step) or the reference model's (KL)."""
    out = [None] * len(rollouts)
    for chunk in even_micro_batches(acc, [len(r.prompt_ids) + len(r.ids) for r in rollouts], args.micro_batch_tokens):
        with ctx():
            logp, _ = score(model, [rollouts[i] for i in chunk or [0]], tags, args.variant, args.temperature, pad,
                            acc.device)
        for i, lp in zip(chunk, logp):
            out[i] = lp[:len(rollouts[i].ids)]
    return out


def log_row(acc, step, args, rollouts, graded, zero_groups, groups, stats, t0, t_rollout):
    """The step's metrics row: sums reduced over ranks, then divided."""
    m = {k: sum(g[1][k] for g in graded) for k in ("correct", "has_block", "format_ok")}
    m.update(reward=sum(g[0] for g in graded), length=sum(len(r.ids) for r in rollouts), zero_groups=zero_groups,
             groups=groups, **stats, **{f"b_{k}": v for k, v in metrics.sums(rollouts).items()})
    m = {k: v.item() for k, v in zip(m, acc.reduce(torch.tensor(list(m.values()), dtype=torch.float64,
                                                                 device=acc.device), "sum"))}
    n = m["b_rollouts"]
    return {"step": step, "reward": m["reward"] / n, "accuracy": m["correct"] / n,
            "parallel_rate": m["has_block"] / n, "format_ok": m["format_ok"] / n, "length": m["length"] / n,
            "zero_adv_groups": m["zero_groups"] / m["groups"], "clip_frac": m["clipped_tokens"] / max(m["tokens"], 1),
            "ratio": m["ratio_sum"] / max(m["tokens"], 1), "logp_gap": m["gap_sum"] / max(m["gap_tokens"], 1),
            "loss": m["loss"],
            **metrics.from_sums({k[2:]: v for k, v in m.items() if k.startswith("b_")}),
            "reward_fn": rewards.reward_fn(args.reward, step, args.scaffold_switch).__name__,
            "rollout_s": t_rollout, "update_s": time.time() - t0 - t_rollout,
            "tokens_per_s": m["length"] / max(t_rollout, 1e-9) / acc.num_processes}  # rollout tokens per rank


def run_eval(model, tokenizer, template, args, acc):
    """The --eval-every hook: each rank evaluates its share of a held-out set; every rank gets the summary."""
    from accelerate.utils import gather_object
    from nanopr1.evaluation import evaluate_everywhere
    problems = data.load(args.eval_data, split="test", data_dir=args.data_dir)[:args.eval_limit]
    summary = evaluate_everywhere(model, tokenizer, problems, args.eval_n, gather_object, acc.process_index,
                                  acc.num_processes, template=template, max_new_tokens=args.max_new_tokens,
                                  num_paths=args.num_paths, max_blocks=args.max_blocks, reserve=args.answer_reserve,
                                  variant=args.variant, seed=args.seed)
    return {f"eval_{k}": v for k, v in summary.items() if isinstance(v, (int, float))}


def parse_args(argv=None):
    """Flags, the preset's and the recipe's defaults; every check that needs no file, before anything loads."""
    args = recipes.parse(p, argv, "train_rl")
    for ok, message in [
            (args.group_size >= 2, f"--group-size {args.group_size}: GRPO compares a prompt's rollouts, 2 or more"),
            (args.temperature > 0, f"--temperature {args.temperature}: RL samples, it must be above 0"),
            (0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
            (args.num_paths >= 2, f"--num-paths {args.num_paths}: a parallel block needs 2 or more paths"),
            (min(args.max_new_tokens, args.max_prompt_tokens) >= 1, "--max-new-tokens, --max-prompt-tokens: 1 or more"),
            ((args.answer_reserve or 0) >= 0, "--answer-reserve must be 0 or more"),
            (min(args.prompts_per_step, args.steps) >= 1, "--prompts-per-step and --steps must be 1 or more"),
            (args.save_every >= 1, f"--save-every {args.save_every}: must be 1 or more"),
            (min(args.ppo_epochs, args.mini_batches) >= 1, "--ppo-epochs and --mini-batches must be 1 or more"),
            (args.mini_batches <= args.prompts_per_step * args.group_size, "--mini-batches: more than the rollouts"),
            (args.micro_batch_tokens >= 1, "--micro-batch-tokens must be 1 or more"),
            ((args.max_rows or 2 ** 30) >= args.num_paths, f"--max-rows: one rollout needs {args.num_paths} rows"),
            (args.lr > 0 and args.kl_coef >= 0, "--lr must be above 0 and --kl-coef 0 or more"),
            (args.eval_every >= 0 and args.eval_n >= 1, "--eval-every must be 0 or more and --eval-n 1 or more")]:
        if not ok:
            raise UsageError(message)
    return args


def plan_only(args):
    """--plan: the memory plan from the model config alone, then exit."""
    from nanopr1.plan import load_config, plan_for
    plan = plan_for(args, load_config(args.init))
    print(f"memory plan per GPU: {args.init}, {'LoRA' if args.lora else 'full fine-tune'}\n{plan}")


if __name__ == "__main__":
    try:
        args = parse_args()
        plan_only(args) if args.plan else main(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
