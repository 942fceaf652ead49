"""
Stage 1 of the curriculum (cold start): supervised fine-tuning on parallel-
thinking traces, so that the model learns the format before RL.

    python train_sft.py --preset toy                       # the toy world, CPU, a few minutes
    python train_sft.py --generate --teacher M             # write the Parallel-GSM8K corpus with a teacher
    accelerate launch train_sft.py --data out/parallel_gsm8k.jsonl   # the 4B run (defaults are the paper's)

Each example is one user turn (the parallel-thinking prompt + a question, through
the chat template) and the teacher's response, normalised to the canonical layout
and format-checked; the loss is on the response tokens only, EOS included.
`--variant unseen` trains with the path-isolating mask and Multiverse positions
of attention.py, built from the response's own block structure (the prompt is
never parsed for tags).

Simplifications relative to the paper:
1. The corpus generator samples one trace per problem and keeps it only if it is
   well formed and correct (no retries), like the paper's filter.
2. Sequences longer than --max-len are dropped (and counted), never truncated mid-block.
3. One checkpoint, overwritten: the model dir is the output dir, resume state in out/state.
"""

import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from nanopr1 import data, format, rewards
from nanopr1.attention import build_inputs
from nanopr1.grpo import token_logprobs
from nanopr1.model import apply_lora, load, resume_step, save_checkpoint, tag_ids

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--preset", choices=["toy"], help="toy: the CPU-sized world (defaults below swapped for toy ones)")
# model
p.add_argument("--model", default="Qwen/Qwen3-4B-Base", help="hub id or local dir to start from")
p.add_argument("--variant", choices=["seen", "unseen"], default="seen", help="unseen: path-isolating attention")
p.add_argument("--lora", action="store_true", help="train LoRA adapters (and the six tag rows) only")
p.add_argument("--lora-r", type=int, default=64)
p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
               help="gradient checkpointing (default: on with a GPU)")
# data
p.add_argument("--data", default="out/parallel_gsm8k.jsonl", help="JSONL with question and response")
p.add_argument("--prompt-file", help="prompt template with a {problem} slot (default: the parallel prompt)")
p.add_argument("--max-len", type=int, default=4096, help="drop longer prompt+response sequences")
# cold-start corpus generation (--generate)
p.add_argument("--generate", action="store_true", help="write a corpus with --teacher instead of training")
p.add_argument("--teacher", default="deepseek-ai/DeepSeek-R1-0528-Qwen3-8B")
p.add_argument("--source", default="gsm8k", help="problems for --generate (name or file)")
p.add_argument("--data-dir", help="read short dataset names from local files in this dir")
p.add_argument("--gen-max-new-tokens", type=int, default=8192, help="teacher budget (thinking included)")
p.add_argument("--gen-batch", type=int, default=16, help="problems per sampler call")
# optimisation
p.add_argument("--batch-size", type=int, default=128, help="sequences per optimizer step (all ranks)")
p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward on one rank")
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--weight-decay", type=float, default=0.01)
p.add_argument("--warmup", type=float, default=0.1, help="share of steps with linear warm-up")
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (the schedule still spans --epochs)")
p.add_argument("--seed", type=int, default=0)
# logging and checkpoints
p.add_argument("--out", default="out/sft", help="output dir: the model, metrics.jsonl, state/")
p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
TOY = dict(model=None, data=None, out="out/toy-sft", max_len=512, batch_size=32, micro_batch=32, lr=3e-3,
           warmup=0.04, epochs=1, save_every=400, grad_ckpt=False)  # 800 steps over toy.sft_corpus(25600)

# -----------------------------------------------------------------------------
# data: (prompt ids, response ids) examples


def make_examples(rows, tokenizer, template, max_len):
    """Tokenise rows into (prompt, response + EOS) id lists. Malformed or too-long traces
    are dropped and counted by reason; the prompt is tokenised apart and never parsed."""
    examples, dropped = [], {}
    for row in rows:
        response = format.normalize(row["response"])
        why = format.check_format(response)
        if why is None:
            prompt = format.chat_prompt_ids(tokenizer, template, row["question"])
            resp = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            why = f"longer than --max-len {max_len}" if len(prompt) + len(resp) > max_len else None
        if why is not None:
            key = why.split(":")[0]
            dropped[key] = dropped.get(key, 0) + 1
            continue
        examples.append((prompt, resp))
    return examples, dropped


def collate(examples, tags, variant, pad_id):
    """A padded batch plus the targets and loss mask of the response tokens."""
    prompts, responses = [e[0] for e in examples], [e[1] for e in examples]
    batch = build_inputs(prompts, responses, tags, variant, pad_id)
    targets = batch["input_ids"][:, 1:]  # (B, T-1) token t+1 is predicted at t
    loss_mask = torch.zeros_like(targets, dtype=torch.bool)
    for b, (p_, r) in enumerate(zip(prompts, responses)):
        loss_mask[b, len(p_) - 1:len(p_) + len(r) - 1] = True  # exactly the response, EOS included
    return batch, targets, loss_mask


def sequence_nll(model, batch, targets, loss_mask):
    """(B,) summed negative log-likelihood of each sequence's response tokens; logits are
    computed from the first position that predicts a response token on."""
    first = int(loss_mask.any(0).nonzero()[0])
    logits = model(**batch, logits_to_keep=targets.shape[1] + 1 - first).logits[:, :-1]  # (B, T-1-first, V)
    logp = token_logprobs(logits, targets[:, first:])  # fp32, upcast a chunk at a time
    return -(logp * loss_mask[:, first:]).sum(1)


def batches(n, batch_size, seed, epoch):
    """The step batches of one epoch: a fixed permutation per (seed, epoch), so resuming
    at any step sees the same data order as the uninterrupted run."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]

# -----------------------------------------------------------------------------
# cold-start corpus generation


def generate_corpus(args):
    """Sample one trace per problem with the teacher (parallel forking off: it writes the
    whole trace), keep it if well formed and correct, write JSONL, report counts."""
    from nanopr1.sampler import sample
    model, tokenizer = load(args.teacher, "bfloat16" if torch.cuda.is_available() else "float32",
                            "cuda" if torch.cuda.is_available() else "cpu")
    template = format.load_template(args.prompt_file) if args.prompt_file else format.PARALLEL_PROMPT
    problems = data.load(args.source, split="train", data_dir=args.data_dir)
    Path(args.data).parent.mkdir(parents=True, exist_ok=True)
    kept, rejected = 0, {}
    with open(args.data, "w", encoding="utf-8") as f:
        for i in tqdm(range(0, len(problems), args.gen_batch), desc="teacher"):
            chunk = problems[i:i + args.gen_batch]
            prompts = [format.chat_prompt_ids(tokenizer, template, r["question"]) for r in chunk]
            rollouts = sample(model, tokenizer, prompts, parallel=False, max_new_tokens=args.gen_max_new_tokens,
                              temperature=0.6, seed=args.seed + i)
            for row, ro in zip(chunk, rollouts):
                text = ro.text.split("</think>")[-1].strip()  # drop the teacher's thinking, if any
                response = format.normalize(text)
                why = format.check_format(response)
                if why is None and not format.parse(response).blocks:
                    why = "no parallel block"
                if why is None and not rewards.grade(response, row["answer"]):
                    why = "wrong final answer"
                if why is None:
                    f.write(json.dumps({"question": row["question"], "answer": row["answer"], "response": response}) + "\n")
                    kept += 1
                else:
                    key = why.split(":")[0]
                    rejected[key] = rejected.get(key, 0) + 1
    print(f"kept {kept}/{len(problems)} ({kept / max(len(problems), 1):.1%}) -> {args.data}; rejected: {rejected}")

# -----------------------------------------------------------------------------


def main(args):
    if args.generate:
        return generate_corpus(args)
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.model is None:  # the toy model starts from scratch: an untrained model dir
        from nanopr1 import toy
        args.model = str(out / "init")
        if acc.is_main_process and not (out / "init").is_dir():
            toy.init_dir(args.model, seed=args.seed)
        acc.wait_for_everyone()
    model, tokenizer = load(args.model)  # on --resume, load_state below restores the trained weights
    tags = tag_ids(tokenizer)
    template = format.load_template(args.prompt_file) if args.prompt_file else format.PARALLEL_PROMPT
    if args.preset == "toy":
        from nanopr1 import toy
        template = toy.TEMPLATE
        rows = data.load(args.data) if args.data else toy.sft_corpus(25600, seed=args.seed)
    else:
        rows = data.load(args.data)
    examples, dropped = make_examples(rows, tokenizer, template, args.max_len)
    acc.print(f"{len(examples)}/{len(rows)} traces kept; dropped: {dropped or 'none'}")
    if args.lora:
        model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r, train_tokens=list(tags.values()))
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    world, rank = acc.num_processes, acc.process_index
    if args.batch_size % (world * args.micro_batch):
        raise SystemExit(f"error: --batch-size {args.batch_size} must be a multiple of "
                         f"processes x --micro-batch = {world * args.micro_batch}")
    per_epoch = len(examples) // args.batch_size
    if per_epoch == 0:
        raise SystemExit(f"error: {len(examples)} examples is fewer than one batch of {args.batch_size}")
    total = per_epoch * args.epochs  # the LR schedule's length
    stop = min(args.max_steps or total, total)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=args.weight_decay)
    warm = max(1, int(args.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * max(0, s + 1 - warm) / max(1, total - warm)))))
    model, opt, sched = acc.prepare(model, opt, sched)
    step = resume_step(acc, out, args.resume)
    bar = tqdm(total=stop, initial=step, desc="sft", disable=not acc.is_main_process)
    while step < stop:
        t0 = time.time()
        epoch, k = divmod(step, per_epoch)
        idx = batches(len(examples), args.batch_size, args.seed, epoch)[k]
        mine = [examples[i] for i in idx[rank::world]]  # this rank's share of the step
        n_tokens = sum(len(examples[i][1]) for i in idx)  # response tokens of the WHOLE step, all ranks
        nll_sum = 0.0
        for j in range(0, len(mine), args.micro_batch):
            batch, targets, loss_mask = collate(mine[j:j + args.micro_batch], tags, args.variant, tokenizer.pad_token_id)
            batch = {key: v.to(acc.device) for key, v in batch.items()}
            last = j + args.micro_batch >= len(mine)
            with nullcontext() if last else acc.no_sync(model):  # all-reduce gradients once per step
                nll = sequence_nll(model, batch, targets.to(acc.device), loss_mask.to(acc.device)).sum()
                acc.backward(nll * world / n_tokens)  # DDP averages over ranks: * world makes it a sum
            nll_sum += nll.item()
        grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss = acc.reduce(torch.tensor(nll_sum, device=acc.device), "sum").item() / n_tokens
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
               "tokens": n_tokens, "seconds": time.time() - t0}
        if acc.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update()
        if step % args.save_every == 0 or step == stop:
            save_checkpoint(acc, model, tokenizer, out, args, step)
    bar.close()
    acc.print(f"done: {step} steps, model in {out}")


def parse_args(argv=None):
    args = p.parse_args(argv)
    if args.preset == "toy":  # swap in the toy defaults, then let explicit flags win again
        p.set_defaults(**TOY)
        args = p.parse_args(argv)
    return args


if __name__ == "__main__":
    args = parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        main(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
