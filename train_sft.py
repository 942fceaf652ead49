"""
Stage 1 of the curriculum (cold start): supervised fine-tuning on parallel-thinking traces, so that the
model learns the format before RL.

    python train_sft.py --preset toy                    # the toy world, CPU, a few minutes
    python train_sft.py --generate --teacher M          # write the Parallel-GSM8K corpus with a teacher
    accelerate launch train_sft.py --data out/parallel_gsm8k.jsonl   # the 4B run (defaults: the paper's)

Each example is one user turn (the prompt + a question, through the chat template) and the teacher's
response in the canonical layout; the loss is on the response tokens only, EOS included. `--variant
unseen` trains with the path-isolating mask and Multiverse positions of attention.py.

Simplifications relative to the paper:
1. The corpus generator samples one trace per problem and keeps it only if it is well formed and correct
   (no retries), like the paper's filter.
2. Sequences longer than --max-len are dropped (and counted), never truncated mid-block.
"""

import argparse
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm import tqdm

from nanopr1 import UsageError, checkpoint, corpus, data, logs, recipes, run_script, toy
from nanopr1.format import tag_ids
from nanopr1.model import apply_lora, load_model
from nanopr1.scoring import collate, micro_batches_on_every_rank, sequence_nll

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument
arg("--preset", choices=["toy"], help="toy: the CPU-sized world (the defaults below swapped for toy ones)")
# model
arg("--model", default="Qwen/Qwen3-4B-Base", help="hub id or local dir to start from")
arg("--variant", choices=["seen", "unseen"], default="seen", help="unseen: path-isolating attention")
arg("--lora", action="store_true", help="train LoRA adapters (and the six tag rows) only")
arg("--lora-r", type=int, default=64)
arg("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing (toy: off)")
# data
arg("--data", default="out/parallel_gsm8k.jsonl", help="traces: question + response, TRL's messages, or "
    "prompt + completion records (a file or a hub id)")
arg("--data-config", help="the hub dataset's config (name)")
arg("--data-split", default="train")
arg("--question-key", help="the question's column (default: question, problem, prompt, ...)")
arg("--response-key", help="the trace's column (default: response, else TRL's messages / completion)")
arg("--prompt-file", help="prompt template with a {problem} slot (default: the parallel prompt)")
arg("--max-len", type=int, default=4096, help="drop longer prompt + response sequences")
# cold-start corpus generation (--generate)
arg("--generate", action="store_true", help="write a corpus with --teacher (a rerun resumes)")
arg("--teacher", default="deepseek-ai/DeepSeek-R1-0528-Qwen3-8B")
arg("--source", default="gsm8k", help="problems for --generate (name or file)")
arg("--data-dir", help="read the short dataset names from local files in this dir")
arg("--gen-max-new-tokens", type=int, default=8192, help="the teacher's budget (thinking included)")
arg("--gen-batch", type=int, default=16, help="problems per sampler call")
# optimisation
arg("--batch-size", type=int, default=128, help="sequences per optimizer step (all ranks)")
arg("--micro-batch-tokens", type=int, default=16384, help="rows x padded length of one forward")
arg("--lr", type=float, default=1e-5)
arg("--weight-decay", type=float, default=0.01)
arg("--warmup", type=float, default=0.1, help="share of the steps with a linear warm-up")
arg("--epochs", type=int, default=5, help="passes over the traces (official: 5)")
arg("--max-steps", type=int, default=0, help="train N steps (0: --epochs); the schedule spans them")
arg("--seed", type=int, default=0)
# logging and checkpoints
arg("--out", help="output dir (default: out/sft, out/sft-unseen)")
arg("--report-to", choices=["none", "tensorboard", "wandb"], default="none", help="also log to a tracker")
arg("--project", default="nanopr1", help="the tracker's project")
arg("--run-name", help="the tracker's run name (default: OUT's name)")
arg("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
arg("--keep-checkpoints", type=int, default=1, help="the newest K step checkpoints are kept")
arg("--resume", action="store_true", help="continue the run in --out")
arg("--overwrite", action="store_true", help="start over in an --out that holds a run (--generate: --data)")
# memory plan
arg("--plan", action="store_true", help="print the per-GPU memory plan and exit (needs a config.json only)")
arg("--gpu-memory-gb", type=float, help="for the plan: one GPU's memory (default: this device's)")
arg("--num-gpus", type=int, help="for the plan: the run's GPUs (default: this launch's processes)")
# --resume keeps the run's value of every flag not typed again; typed anew, a flag of APPLY is used (and
# said), one of REFUSE is an error; LOCAL flags belong to this invocation only (or to --generate)
APPLY = ("lr", "max_steps", "save_every", "keep_checkpoints", "micro_batch_tokens", "grad_ckpt", "report_to",
         "project", "run_name")
LOCAL = ("resume", "overwrite", "out", "plan", "gpu_memory_gb", "num_gpus", "generate", "teacher", "source",
         "data_dir", "gen_max_new_tokens", "gen_batch")
REFUSE = tuple(a.dest for a in parser._actions if a.dest not in APPLY + LOCAL + ("help",)) + ("script",)


def main(args):
    if args.generate:  # the cold-start corpus instead of training
        acc = Accelerator()
        template = recipes.template(args.prompt_file, args.preset == "toy")
        corpus.generate(acc, template, args.data, args.source, args.teacher, seed=args.seed, data_dir=args.data_dir,
                        max_new_tokens=args.gen_max_new_tokens, batch=args.gen_batch, overwrite=args.overwrite)
        acc.wait_for_everyone()
        return acc.end_training()  # the process group down before exit
    # one Accelerator: the same file runs under python and under accelerate launch (bf16 autocast on a GPU)
    out, cuda = Path(args.out), torch.cuda.is_available()
    acc = Accelerator(mixed_precision="bf16" if cuda else "no", log_with=None if args.report_to == "none" else
                      args.report_to, project_config=ProjectConfiguration(out, logging_dir=out / "tensorboard"))
    world, rank = acc.num_processes, acc.process_index
    acc.print(f"{world} process{'es' if world > 1 else ''} ({acc.device}, {acc.distributed_type.value})")
    acc.print(checkpoint.prepare_out(out, args, acc, args.resume, args.overwrite, REFUSE, APPLY))
    torch.manual_seed(args.seed)
    # the traces, as (prompt ids, response ids) examples
    if args.data:
        rows = data.load_problems(args.data, args.data_split, response=True, config=args.data_config,
                                  question_key=args.question_key, response_key=args.response_key)
    else:  # the toy preset: its teacher's traces, and an untrained toy model
        rows = toy.sft_corpus(25600, seed=args.seed)
    # the model to train: a hub id or a local dir, or (the toy preset) an untrained toy model
    if args.model is None:
        tokenizer = toy.build_tokenizer()
        model = toy.new_model(tokenizer, seed=args.seed)
    else:  # LoRA: a frozen bf16 base
        init = checkpoint.model_dir(args.model)  # a run dir: its newest valid checkpoint
        model, tokenizer = load_model(init, "bfloat16" if cuda and args.lora else "float32")
    tags = tag_ids(tokenizer)
    template = recipes.template(args.prompt_file, args.preset == "toy")
    examples, dropped = data.sft_examples(rows, tokenizer, template, args.max_len)
    acc.print(f"{len(examples)}/{len(rows)} traces kept; dropped: {dropped or 'none'}")
    # a step's batch splits evenly over the processes; an epoch holds at least one batch
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must divide over {world} processes")
    per_epoch = len(examples) // args.batch_size
    if per_epoch == 0:
        raise UsageError(f"{len(examples)} examples is fewer than one batch of {args.batch_size}")
    # the model, its optimizer and the schedule: linear warm-up, then cosine towards 0 at the last step
    if args.lora:
        model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r, train_tokens=list(tags.values()))
    if args.grad_ckpt:  # (a CPU too: a 135M model's 2,048-token step peaks at 3.6 GB without, 1.1 GB with)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total = args.max_steps or per_epoch * args.epochs  # the schedule's length (as HF Trainer: max steps wins)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=args.weight_decay)
    model, opt = acc.prepare(model, opt)
    warm = max(1, int(args.warmup * total))
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * max(0, s + 1 - warm) / (total - warm + 1)))  # > 0 at the end
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, cosine(s)))
    acc.register_for_checkpointing(sched)  # not prepared: accelerate would step it once per process per step
    out.mkdir(parents=True, exist_ok=True)
    step = skipped = 0
    # --resume: the model, optimizer, schedule and RNG as saved; the step is the data position
    if args.resume and checkpoint.checkpoints(out):
        step = checkpoint.load_state(out, acc)
        checkpoint.apply_lr(opt, args.lr, sched)
    logs.start_trackers(acc, args)
    bar = tqdm(total=total, initial=step, desc="sft", disable=not acc.is_main_process)
    while step < total:
        t0 = time.time()
        # 1) the step's examples: a batch of its epoch's fixed order, this rank's share of it
        epoch, k = divmod(step, per_epoch)
        idx = data.epoch_batches(len(examples), args.batch_size, args.seed, epoch)[k]
        mine = [examples[i] for i in idx[rank::world]]
        n_tokens = sum(len(examples[i][1]) for i in idx)  # response tokens of the WHOLE step, all ranks
        # 2) forward and backward by micro-batches: the loss is the NLL summed over the step / its tokens
        nll_sum = 0.0
        lengths = [len(p) + len(r) for p, r in mine]
        for chunk, filler in micro_batches_on_every_rank(acc, lengths, args.micro_batch_tokens, model):
            batch, loss_mask = collate([mine[i] for i in chunk], tags, args.variant, tokenizer.pad_token_id)
            batch = {key: v.to(acc.device) for key, v in batch.items()}
            # a filler (it evens out the ranks' micro-batch counts) runs forward and backward but adds nothing
            nll = sequence_nll(model, batch, loss_mask.to(acc.device)).sum() * (not filler)
            acc.backward(nll * world / n_tokens)  # DDP averages over ranks: * world makes it a sum
            nll_sum += nll.item()
        # 3) the optimizer step, on the schedule
        #    (a non-finite gradient norm skips the update; 3 in a row stop the run)
        grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0)
        lr, finite = sched.get_last_lr()[0], bool(torch.isfinite(grad_norm))
        if finite:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, skipped = step + 1, 0 if finite else skipped + 1
        # 4) log (reduced over ranks), checkpoint
        loss = acc.reduce(torch.tensor(nll_sum, device=acc.device), "sum").item() / n_tokens
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": n_tokens,
               "skipped_update": int(not finite), "seconds": time.time() - t0}
        logs.log_metrics(acc, out, row)
        # the third non-finite update in a row stops the run, once its step is logged
        if skipped >= 3:
            raise UsageError(f"step {step}: {skipped} updates in a row had a non-finite loss or gradient norm: "
                             f"stopped (the last checkpoint in {out} is kept)")
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update()
        # a checkpoint every --save-every steps and at the end (on every rank: FSDP gathers the weights)
        if step % args.save_every == 0 or step == total:
            checkpoint.save_checkpoint(out, step, acc, model, tokenizer, args, args.keep_checkpoints)
    # every rank done before the process group goes down
    bar.close()
    acc.wait_for_everyone()
    acc.end_training()
    acc.print(f"done: {step} steps, model in {out}")


def parse_args(argv=None):
    """Flags and the toy preset's defaults; every check that needs no file, before anything loads."""
    args = recipes.parse(parser, argv, "train_sft")
    # the default OUT: where the RL stages look for it
    if args.out is None:
        args.out = ("out/toy-sft" if args.preset == "toy" else "out/sft") + "-unseen" * (args.variant == "unseen")
    args.run_name = args.run_name or Path(args.out).name
    if args.resume and not args.generate:  # the run's own flags, before anything reads them
        checkpoint.resume_args(args.out, args, REFUSE, APPLY)
    recipes.check_ranges(args, parser, dict(batch_size=1, micro_batch_tokens=1, epochs=1, save_every=1,
                                            keep_checkpoints=1, lr=0.0, max_len=2, gen_batch=1, gen_max_new_tokens=1,
                                            lora_r=1, gpu_memory_gb=0.0, num_gpus=1))
    if args.warmup >= 1:
        raise UsageError(f"--warmup {args.warmup}: must be in [0, 1)")
    recipes.check_out(args.out)  # a file in the way: one line, before anything loads
    recipes.check_tracker(args.report_to)
    return args


def plan_or_train(argv=None):
    """--plan: the memory plan from the model config alone; else the run."""
    args = parse_args(argv)
    if not args.plan:
        return main(args)
    from nanopr1.plan import load_config, plan_for
    plan = plan_for(load_config(args.model), sampling=False, gpu_memory_gb=args.gpu_memory_gb, num_gpus=args.num_gpus,
                    lora_r=args.lora_r if args.lora else 0, grad_ckpt=args.grad_ckpt is not False,
                    micro_batch_tokens=args.micro_batch_tokens, unseen=args.variant == "unseen")
    print(f"memory plan per GPU: {args.model}, SFT, {'LoRA' if args.lora else 'full fine-tune'}\n{plan}")


if __name__ == "__main__":
    run_script(plan_or_train, checkpoint.release)
