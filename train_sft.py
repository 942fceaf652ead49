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
"""

import argparse
import glob
import hashlib
import json
import math
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from tqdm import tqdm

from nanopr1 import UsageError, checkpoint, data, format, recipes, toy
from nanopr1.scoring import collate, micro_batches, sequence_nll
from nanopr1.model import apply_lora, load, tag_ids

# --resume keeps the run's value of every flag not typed again; typed anew, a flag of APPLY is used (and
# said), one of REFUSE is an error; LOCAL flags belong to this invocation only (or to --generate).
APPLY = ("lr", "max_steps", "save_every", "keep_checkpoints", "micro_batch_tokens", "grad_ckpt", "report_to",
         "project", "run_name")
LOCAL = ("resume", "overwrite", "out", "plan", "gpu_memory_gb", "num_gpus", "generate", "teacher", "source",
         "data_dir", "gen_max_new_tokens", "gen_batch")
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--preset", choices=["toy"], help="toy: the CPU-sized world (defaults below swapped for toy ones)")
# model
p.add_argument("--model", default="Qwen/Qwen3-4B-Base", help="hub id or local dir to start from")
p.add_argument("--variant", choices=["seen", "unseen"], default="seen", help="unseen: path-isolating attention")
p.add_argument("--lora", action="store_true", help="train LoRA adapters (and the six tag rows) only")
p.add_argument("--lora-r", type=int, default=64)
p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, help="gradient checkpointing (default: on a GPU)")
# data
p.add_argument("--data", default="out/parallel_gsm8k.jsonl", help="traces: question + response, TRL's messages, "
               "or prompt + completion records (a file or a hub id)")
p.add_argument("--data-config", help="the hub dataset's config (name)")
p.add_argument("--data-split", default="train", help="the split to train on")
p.add_argument("--question-key", help="the column holding the question (default: question, problem, prompt, ...)")
p.add_argument("--prompt-file", help="prompt template with a {problem} slot (default: the parallel prompt)")
p.add_argument("--max-len", type=int, default=4096, help="drop longer prompt+response sequences")
# cold-start corpus generation (--generate)
p.add_argument("--generate", action="store_true", help="write a corpus with --teacher (idempotent: a rerun resumes)")
p.add_argument("--teacher", default="deepseek-ai/DeepSeek-R1-0528-Qwen3-8B")
p.add_argument("--source", default="gsm8k", help="problems for --generate (name or file)")
p.add_argument("--data-dir", help="read short dataset names from local files in this dir")
p.add_argument("--gen-max-new-tokens", type=int, default=8192, help="teacher budget (thinking included)")
p.add_argument("--gen-batch", type=int, default=16, help="problems per sampler call")
# optimisation
p.add_argument("--batch-size", type=int, default=128, help="sequences per optimizer step (all ranks)")
p.add_argument("--micro-batch-tokens", type=int, default=16384, help="rows x padded length of one forward")
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--weight-decay", type=float, default=0.01)
p.add_argument("--warmup", type=float, default=0.1, help="share of steps with linear warm-up")
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--max-steps", type=int, default=0, help="train N steps (0: --epochs); the schedule spans them")
p.add_argument("--seed", type=int, default=0)
# logging and checkpoints
p.add_argument("--out", help="output dir: checkpoint-* (the model), metrics.jsonl (default: out/sft, out/sft-unseen)")
p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none",
               help="also log metrics.jsonl's rows to a tracker (tensorboard: OUT/tensorboard/<run name>)")
p.add_argument("--project", default="nanopr1", help="the tracker's project")
p.add_argument("--run-name", help="the tracker's run name (default: OUT's name)")
p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
p.add_argument("--keep-checkpoints", type=int, default=1, help="the newest K step checkpoints are kept")
p.add_argument("--resume", action="store_true", help=f"continue the run in --out (may change: {', '.join(APPLY)})")
p.add_argument("--overwrite", action="store_true",
               help="start over in an --out that holds a run (with --generate: the corpus at --data)")
# memory plan
p.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit (needs only a config.json)")
p.add_argument("--gpu-memory-gb", type=float, help="for the plan: memory of one GPU (default: this device's)")
p.add_argument("--num-gpus", type=int, help="for the plan: GPUs of the run (default: this launch's processes)")

REFUSE = tuple(a.dest for a in p._actions if a.dest not in APPLY + LOCAL + ("help",)) + ("script",)

# -----------------------------------------------------------------------------
# cold-start corpus generation


def generate_corpus(args):
    """Sample one trace per problem with the teacher (parallel forking off: it writes the whole trace)
    and keep it if well formed and correct (data.judge_trace). Problem i is sampled on rank i % world
    with seed --seed + i, so the corpus depends on neither the number of processes nor --gen-batch.
    Each rank appends every decision to <data>.rank<r>.jsonl as it goes, and a rerun skips the decided
    problems: generation is idempotent and resumes. At the end rank 0 writes the kept traces to <data>
    in problem order, the rejections and the settings to <data>.meta.json, and reports the counts."""
    from nanopr1 import kvcache
    from nanopr1.sampler import Options, sample
    acc = Accelerator()
    world, rank = acc.num_processes, acc.process_index
    procs = f"{world} process{'es' if world > 1 else ''}"
    out, meta_file = Path(args.data), Path(f"{args.data}.meta.json")
    rank_files = lambda: sorted(out.parent.glob(glob.escape(out.name) + ".rank*.jsonl"))
    template = recipes.template(args)
    problems = data.load(args.source, split="train", data_dir=args.data_dir)
    digest = lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]
    settings = {"source": args.source, "teacher": args.teacher, "seed": args.seed, "prompt": digest(template),
                "max_new_tokens": args.gen_max_new_tokens, "problems": digest([[r["question"], r["answer"]]
                                                                               for r in problems])}

    def replace(path, text):  # written aside and renamed: a kill leaves the old file whole
        Path(f"{path}.tmp").write_text(text, encoding="utf-8")
        Path(f"{path}.tmp").replace(path)

    # 1) an earlier corpus at --data: resumed if it was made with these settings, else refused (or --overwrite)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    if (out.is_file() or meta or rank_files()) and not args.overwrite and (meta or {}).get("settings") != settings:
        differs = ("other settings (" + ", ".join(k for k in settings if meta["settings"].get(k) != settings[k]) + ")"
                   if meta else f"unknown settings (no {meta_file.name})")
        raise UsageError(f"{out} holds a corpus generated with {differs}: pass --overwrite to replace it, or another --data")
    acc.wait_for_everyone()  # every rank has looked before rank 0 deletes or writes anything
    if acc.is_main_process and (args.overwrite or meta is None):
        for f in [out, meta_file, *rank_files()]:
            f.unlink(missing_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        replace(meta_file, json.dumps({"settings": settings, "rejected": []}))
    acc.wait_for_everyone()
    # 2) the decisions of earlier runs (kept in <data>, rejected in the meta file, any in rank files of killed runs)
    old = data.read_rows(out) + json.loads(meta_file.read_text())["rejected"]
    decided = {r["index"]: r for r in old + [r for f in rank_files() for r in data.read_rows(f)]}
    todo = [i for i in range(rank, len(problems), world) if i not in decided]  # this rank's share of the rest
    acc.print(f"{len(decided)}/{len(problems)} problems decided before; sampling {len(problems) - len(decided)} on {procs}")
    acc.wait_for_everyone()  # every rank has read the files before any appends to them
    # 3) sample this rank's share, appending each batch's decisions as soon as they are made
    if todo:
        model, tokenizer = load(args.teacher, "bfloat16" if acc.device.type == "cuda" else "float32", str(acc.device))
        longest = max(len(format.chat_prompt_ids(tokenizer, template, problems[i]["question"])) for i in todo)
        cache = kvcache.for_call(model, Options(max_new_tokens=args.gen_max_new_tokens, parallel=False),
                                 [[0] * longest], args.gen_batch, None)[0]  # one KV cache for every batch
        mine = Path(f"{out}.rank{rank}.jsonl")
        bar = tqdm(total=len(todo), desc="teacher", disable=not acc.is_main_process)
        with open(mine, "a", encoding="utf-8") as f:
            if f.tell() and not mine.read_bytes().endswith(b"\n"):
                f.write("\n")  # a line torn by a kill stays apart from the rows appended now
            for k in range(0, len(todo), args.gen_batch):
                chunk = todo[k:k + args.gen_batch]
                prompts = [format.chat_prompt_ids(tokenizer, template, problems[i]["question"]) for i in chunk]
                rollouts = sample(model, tokenizer, prompts, parallel=False, max_new_tokens=args.gen_max_new_tokens,
                                  temperature=0.6, seed=[args.seed + i for i in chunk], cache=cache)  # a seed per problem
                for i, ro in zip(chunk, rollouts):
                    response, why = data.judge_trace(ro.text, problems[i]["answer"])
                    row = {"index": i, "rejected": why} if why else {"index": i, "question": problems[i]["question"],
                                                                     "answer": problems[i]["answer"], "response": response}
                    f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(len(chunk))
        bar.close()
    # 4) rank 0 merges every decision: the kept traces into <data>, the rejections into the meta file
    acc.wait_for_everyone()
    if acc.is_main_process:
        new = [r for f in rank_files() for r in data.read_rows(f) if r["index"] not in decided]
        rows = [r for _, r in sorted({**decided, **{r["index"]: r for r in new}}.items())]
        kept, rejected = [r for r in rows if "rejected" not in r], [r for r in rows if "rejected" in r]
        replace(meta_file, json.dumps({"settings": settings, "rejected": rejected}))
        replace(out, "".join(json.dumps(r) + "\n" for r in kept))
        for f in rank_files():
            f.unlink()
        reasons = dict(Counter(r["rejected"] for r in rejected).most_common())
        print(f"kept {len(kept)}/{len(problems)} ({len(kept) / max(len(problems), 1):.1%}) -> {out}; rejected: "
              f"{reasons}; {len(new)} sampled now on {procs}")
    acc.end_training()  # the process group down before exit

# -----------------------------------------------------------------------------


def main(args):
    if args.generate:
        return generate_corpus(args)
    out, cuda = Path(args.out), torch.cuda.is_available()
    acc = Accelerator(mixed_precision="bf16" if cuda else "no", log_with=None if args.report_to == "none" else
                      args.report_to, project_config=ProjectConfiguration(out, logging_dir=out / "tensorboard"))
    world, rank = acc.num_processes, acc.process_index
    acc.print(f"{world} process{'es' if world > 1 else ''} ({acc.device}, {acc.distributed_type.value})")
    acc.print(checkpoint.prepare_out(out, args, acc, args.resume, args.overwrite, REFUSE, APPLY))
    torch.manual_seed(args.seed)
    template = recipes.template(args)
    rows = data.load(args.data, args.data_split, fields=("response",), config=args.data_config,
                     question_key=args.question_key) if args.data else toy.sft_corpus(25600, seed=args.seed)
    if args.model is None:  # the toy preset starts from scratch: an untrained toy model
        tokenizer = toy.build_tokenizer()
        model = toy.new_model(tokenizer, seed=args.seed)
    else:
        model, tokenizer = load(args.model, "bfloat16" if cuda and args.lora else "float32")  # LoRA: a frozen bf16 base
    tags = tag_ids(tokenizer)
    examples, dropped = data.sft_examples(rows, tokenizer, template, args.max_len)
    acc.print(f"{len(examples)}/{len(rows)} traces kept; dropped: {dropped or 'none'}")
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must divide over {world} processes")
    per_epoch = len(examples) // args.batch_size
    if per_epoch == 0:
        raise UsageError(f"{len(examples)} examples is fewer than one batch of {args.batch_size}")
    if args.lora:
        model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r, train_tokens=list(tags.values()))
    if args.grad_ckpt or args.grad_ckpt is None and cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total = args.max_steps or per_epoch * args.epochs  # the LR schedule's length (HF Trainer: max steps wins)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=args.weight_decay)
    model, opt = acc.prepare(model, opt)
    warm = max(1, int(args.warmup * total))  # linear warm-up, then cosine towards 0 at the last step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * max(0, s + 1 - warm) / (total - warm + 1)))))  # the last step's lr is small, not 0
    acc.register_for_checkpointing(sched)  # not prepared: accelerate would step it once per process per step
    out.mkdir(parents=True, exist_ok=True)
    step = 0
    if args.resume and checkpoint.latest(out):  # model, optimizer, schedule and RNG as saved; data position: step
        step = checkpoint.load_state(out, acc)
        checkpoint.apply_lr(opt, args.lr, sched)
    checkpoint.start_trackers(acc, args)
    bar = tqdm(total=total, initial=step, desc="sft", disable=not acc.is_main_process)
    while step < total:
        t0 = time.time()
        epoch, k = divmod(step, per_epoch)
        idx = data.epoch_batches(len(examples), args.batch_size, args.seed, epoch)[k]
        mine = [examples[i] for i in idx[rank::world]]  # this rank's share of the step
        n_tokens = sum(len(examples[i][1]) for i in idx)  # response tokens of the WHOLE step, all ranks
        chunks = micro_batches([len(p_) + len(r) for p_, r in mine], args.micro_batch_tokens)
        n = int(acc.reduce(torch.tensor(len(chunks), device=acc.device), "max").item())
        chunks += [[]] * (n - len(chunks))  # as many forwards on every rank (FSDP: each is a collective)
        nll_sum = 0.0
        for j, chunk in enumerate(chunks):
            batch, targets, loss_mask = collate([mine[i] for i in chunk or [0]], tags, args.variant, tokenizer.pad_token_id)
            batch = {key: v.to(acc.device) for key, v in batch.items()}
            last = j == len(chunks) - 1  # DDP: all-reduce once per step; FSDP: reduce-scatter each micro-batch
            with nullcontext() if last or acc.distributed_type == DistributedType.FSDP else acc.no_sync(model):
                nll = sequence_nll(model, batch, targets.to(acc.device), loss_mask.to(acc.device)).sum() * bool(chunk)
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
        checkpoint.log_metrics(acc, out, row)
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update()
        if step % args.save_every == 0 or step == total:  # every rank (FSDP gathers); the previous survives a kill
            checkpoint.save_run(out, step, acc, model, tokenizer, args, args.keep_checkpoints)
    bar.close()
    acc.end_training()
    acc.print(f"done: {step} steps, model in {out}")


def plan_only(args):
    """--plan: the memory plan from the model config alone, then exit."""
    from nanopr1.plan import load_config, plan_for
    plan = plan_for(args, load_config(args.model), sampling=False)
    print(f"memory plan per GPU: {args.model}, SFT, {'LoRA' if args.lora else 'full fine-tune'}\n{plan}")


def parse_args(argv=None):
    args = recipes.parse(p, argv, "train_sft")
    if args.out is None:  # where the RL stages look for it
        args.out = ("out/toy-sft" if args.preset == "toy" else "out/sft") + ("-unseen" if args.variant == "unseen" else "")
    args.run_name = args.run_name or Path(args.out).name
    checks = [(args.batch_size >= 1 and args.micro_batch_tokens >= 1, "--batch-size and --micro-batch-tokens must be 1 or more"),
              (args.epochs >= 1 and args.max_steps >= 0, "--epochs must be 1 or more and --max-steps 0 or more"),
              (min(args.save_every, args.keep_checkpoints) >= 1, "--save-every and --keep-checkpoints: 1 or more"),
              (args.lr > 0 and 0 <= args.warmup < 1, "--lr must be above 0 and --warmup in [0, 1)"),
              (args.max_len >= 2, "--max-len must be 2 or more"),
              (args.gen_batch >= 1 and args.gen_max_new_tokens >= 1, "--gen-batch and --gen-max-new-tokens must be 1 or more")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return args


if __name__ == "__main__":
    try:
        args = parse_args()
        plan_only(args) if args.plan else main(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
