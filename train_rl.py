"""
Stages 2 and 3 of the curriculum: GRPO with our own loop.

    python train_rl.py --preset toy --stage easy              # the toy, CPU, after train_sft.py --preset toy
    accelerate launch --config_file configs/fsdp_8gpu.yaml train_rl.py --stage easy   # GSM8K
    accelerate launch --config_file configs/fsdp_8gpu.yaml train_rl.py --stage hard   # DAPO-Math-17k
    accelerate launch --config_file configs/lora_1gpu.yaml train_rl.py --stage hard --lora
    python train_rl.py --plan --init DIR --num-gpus 8 --gpu-memory-gb 80   # will it fit? DIR: a config.json

A step reads top to bottom: prompts -> rollouts -> rewards -> group advantages -> old log-probs ->
clipped loss -> backward -> optimizer step -> log -> checkpoint. The defaults of each (stage, variant)
are the official code's recipes (`--help` prints the table), each stage starting from the previous one's
output dir; explicit flags win.

Simplifications relative to the paper / official code (all of them, setting by setting: docs/fidelity.md):
1. Rollouts are sampled by our transformers sampler, not vLLM.
2. Forced (runtime-inserted) tokens carry no loss (official trained on them).
3. The loss is a token mean over the optimizer step (verl: per micro-batch).
"""

import argparse
import time
from collections import Counter, namedtuple
from contextlib import nullcontext
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object
from tqdm import tqdm

from nanopr1 import UsageError, checkpoint, data, every_rank, logs, metrics, recipes, rewards, run_script
from nanopr1.evaluation import evaluate_everywhere
from nanopr1.format import tag_ids
from nanopr1.grpo import group_advantages, policy_loss
from nanopr1.model import apply_lora, load_model, refresh_copy, sampling_copy
from nanopr1.plan import kv_cache_for_run
from nanopr1.rollout import rollout_row
from nanopr1.sampler import mix, sample
from nanopr1.scoring import fixed_logprobs, loss_batches, mini_batches, rollout_logprobs, sampler_gap

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=recipes.table(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument
arg("--preset", choices=["toy"], help="toy: the CPU-sized world")
arg("--stage", choices=["easy", "hard"], default="hard", help="easy: GSM8K; hard: DAPO-Math-17k")
# model
arg("--init", help="checkpoint to start from (default: the recipe's)")
arg("--variant", choices=["seen", "unseen"], default="seen", help="unseen: path-isolating attention")
arg("--lora", action="store_true", help="train LoRA adapters only (one GPU)")
arg("--lora-r", type=int, default=64)
arg("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing (toy: off)")
# data
arg("--data", help="problems: a short name, a file or a hub id (default: the recipe's)")
arg("--data-config", help="the hub dataset's config (name)")
arg("--data-split", default="train")
arg("--question-key", help="the question's column (default: question, problem, prompt, ...)")
arg("--answer-key", help="the gold answer's column (default: answer, ground_truth, ...)")
arg("--data-dir", help="read the short dataset names from local files in this dir")
arg("--prompt-file", help="prompt template with a {problem} slot (default: the parallel prompt)")
arg("--max-prompt-tokens", type=int, default=2000, help="longer prompts are left out (counted)")
# sampling
arg("--group-size", type=int, help="rollouts per prompt (default: the recipe's)")
arg("--num-paths", type=int, default=2)
arg("--max-blocks", type=int, default=4, help="blocks per rollout (official rules: the rollout ends after it)")
arg("--max-new-tokens", type=int, default=3000, help="response budget, everything included")
arg("--rules", choices=["official", "reserve"], default="official", help="official: a path is cut at "
    "--path-max-tokens, the response at --max-new-tokens; reserve: nanopr1's, a block leaves room for the answer")
arg("--path-max-tokens", type=int, help="one path's budget (official: the tokens between its tags, default "
    "4096; reserve: its tags included, default its share)")
arg("--answer-reserve", type=int, help="--rules reserve: tokens a block leaves for its summary and the answer "
    "(default: min(64, max-new-tokens / 8))")
arg("--temperature", type=float, default=1.0)
arg("--top-p", type=float, default=1.0)
arg("--kv-memory-gb", type=float, help="GPU: the KV cache's size (default: what a measured step leaves)")
arg("--max-rows", type=int, help="KV cache rows in flight at most (default: as memory allows)")
# reward
arg("--reward", help=f"{', '.join(rewards.SCHEDULES)} or module:function (default: the recipe's)")
arg("--grader", help="dapo, gsm8k (the official graders), is_equiv (lenient) or module:function "
    "(default: the recipe's)")
arg("--scaffold-switch", type=int, default=200, help="scaffold: alternating until this step, then acc")
# optimisation
arg("--prompts-per-step", type=int, help="prompts per step, all ranks (default: the recipe's)")
arg("--steps", type=int, help="RL steps (default: the recipe's)")
arg("--lr", type=float, default=1e-6)
arg("--weight-decay", type=float, default=0.01)
arg("--clip-low", type=float, default=0.2)
arg("--clip-high", type=float, help="default: 0.28 with the S2 (alternating) reward, else 0.2")
arg("--dual-clip", type=float, default=3.0)
arg("--kl-coef", type=float, default=0.0, help="k3 KL to the initial model (0: off, the paper)")
arg("--ppo-epochs", type=int, default=1)
arg("--mini-batches", type=int, default=2, help="optimizer steps per rollout batch and epoch (official: 2)")
arg("--tis-cap", type=float, help="weight each token's loss by min(trainer / sampler probability, C)")
arg("--micro-batch-tokens", type=int, default=16384, help="rows x padded length of one forward")
arg("--seed", type=int, default=0)
# memory plan
arg("--plan", action="store_true", help="print the per-GPU memory plan and exit (needs a config.json only)")
arg("--gpu-memory-gb", type=float, help="for the plan: one GPU's memory (default: this device's)")
arg("--num-gpus", type=int, help="for the plan: the run's GPUs (default: this launch's processes)")
# logging, checkpoints, eval
arg("--out", help="output dir (default: the recipe's)")
arg("--report-to", choices=["none", "tensorboard", "wandb"], default="none", help="also log to a tracker")
arg("--project", default="nanopr1", help="the tracker's project")
arg("--run-name", help="the tracker's run name (default: OUT's name)")
arg("--log-rollouts", type=int, default=4, help="rollouts a step keeps in OUT/rollouts.jsonl")
arg("--save-every", type=int, default=20)
arg("--keep-checkpoints", type=int, default=1, help="the newest K step checkpoints are kept")
arg("--resume", action="store_true", help="continue the run in --out")
arg("--overwrite", action="store_true", help="start over in an --out that holds a run")
arg("--eval-every", type=int, default=0, help="evaluate on --eval-data every N steps (0: never)")
arg("--eval-data", default="aime25")
arg("--eval-n", type=int, default=4)
arg("--eval-limit", type=int, help="only the first N eval problems")
# --resume keeps the run's value of every flag not typed again; typed anew, a flag of APPLY is used (and
# said), one of REFUSE is an error; LOCAL flags belong to this invocation only
APPLY = ("lr", "steps", "save_every", "keep_checkpoints", "log_rollouts", "eval_every", "eval_data", "eval_n",
         "eval_limit", "micro_batch_tokens", "kv_memory_gb", "max_rows", "grad_ckpt", "report_to", "project",
         "run_name", "data_dir")
LOCAL = ("resume", "overwrite", "out", "plan", "gpu_memory_gb", "num_gpus")
REFUSE = tuple(a.dest for a in parser._actions if a.dest not in APPLY + LOCAL + ("help",)) + ("script",)


def main(args):
    # one Accelerator: the same file runs under python and under accelerate launch (bf16 autocast on a GPU)
    out, cuda = Path(args.out), torch.cuda.is_available()
    trackers = None if args.report_to == "none" else args.report_to
    acc = Accelerator(mixed_precision="bf16" if cuda else "no", log_with=trackers,
                      project_config=ProjectConfiguration(out, logging_dir=out / "tensorboard"))
    world, rank, G = acc.num_processes, acc.process_index, args.group_size
    acc.print(f"{world} process{'es' * (world > 1)} ({acc.device}, {acc.distributed_type.value})")
    acc.print(checkpoint.prepare_out(out, args, acc, args.resume, args.overwrite, REFUSE, APPLY))
    torch.manual_seed(args.seed)
    # OUT is locked and checked; now the run's pieces: problems, model and optimizer, sampling copy, KV cache
    run = prepare(args, acc)
    model, opt, tokenizer, problems, prompts = run.model, run.opt, run.tokenizer, run.problems, run.prompts
    reward, grader = rewards.resolve(args.reward, "reward"), rewards.resolve(args.grader, "grader")
    sampling = dict(num_paths=args.num_paths, max_blocks=args.max_blocks, max_new_tokens=args.max_new_tokens,
                    rules=args.rules, path_max_tokens=args.path_max_tokens, reserve=args.answer_reserve,
                    temperature=args.temperature, top_p=args.top_p, variant=args.variant, max_rows=args.max_rows)
    # the loss's settings, and how the trainer reads a rollout: as the sampler did (tags, variant, temperature)
    objective = dict(eps_low=args.clip_low, eps_high=args.clip_high, dual_clip=args.dual_clip,
                     kl_coef=args.kl_coef, tis_cap=args.tis_cap)
    view = dict(tags=run.tags, variant=args.variant, temperature=args.temperature, pad_id=run.pad,
                device=acc.device)
    out.mkdir(parents=True, exist_ok=True)
    step = skipped = 0
    # --resume: the model, optimizer and RNG as saved; the step is also the data position
    if args.resume and checkpoint.checkpoints(out):
        step = checkpoint.load_state(out, acc)
    checkpoint.apply_lr(opt, args.lr)
    logs.start_trackers(acc, args)
    bar = tqdm(total=args.steps, initial=step, desc=f"rl-{args.stage}", disable=not acc.is_main_process)
    for step in range(step + 1, args.steps + 1):
        t0 = time.time()
        # 1) prompts: this rank's share of the step's problems (whole groups stay on one rank)
        idx = data.step_problems(len(problems), args.prompts_per_step, args.seed, step - 1)[rank::world]
        golds = [problems[i]["answer"] for i in idx for _ in range(G)]
        # 2) rollouts: the branching sampler on the sampling copy, refreshed from the trained weights
        refresh_copy(run.sampler_model, acc.unwrap_model(model))  # every rank: a collective under FSDP
        rollouts = sample(run.sampler_model, tokenizer, [prompts[i] for i in idx], G, cache=run.cache,
                          seed=[mix(args.seed, step, i) for i in idx], **sampling)
        t_rollout = time.time() - t0
        # 3) rewards, and 4) advantages: each reward standardised within its group of G rollouts
        grades = every_rank(acc, lambda: [rewards.reward_rollout(r, gold, reward, step, args.scaffold_switch,
                                                                 grader)[1] for r, gold in zip(rollouts, golds)])
        adv, zero_groups = group_advantages([g["reward"] for g in grades], G)
        # 5) log-probs fixed during the update: the trainer's before its first step (the clipped ratio's old
        #    policy; with one step per batch, the update's own forward) and the reference model's (KL)
        old = ref = None
        if args.ppo_epochs * args.mini_batches > 1:
            old = fixed_logprobs(model, rollouts, acc, args.micro_batch_tokens, **view)
        if run.reference is not None:
            ref = fixed_logprobs(run.reference.model, rollouts, acc, args.micro_batch_tokens,
                                 context=run.reference.context, **view)
        # 6) the update: an optimizer step per mini-batch (a block of the step's prompts, whole groups), its
        #    loss the mean over every loss token of the mini-batch on every rank
        stats, sampler = Counter(), [r.logprobs for r in rollouts] if args.tis_cap else None
        minis = mini_batches(len(idx), G, args.prompts_per_step // args.mini_batches, rank, world)
        for epoch, mini in product(range(args.ppo_epochs), minis):
            # each micro-batch: the trainer's log-probs -> the clipped loss -> backward (gradients add up)
            for micro in loss_batches(acc, model, rollouts, mini, args.micro_batch_tokens, adv, old, ref,
                                      sampler=sampler):
                logp, mask = rollout_logprobs(model, micro.rollouts, **view)  # (B, T) with grad, the loss mask
                old_logp = logp.detach() if micro.old is None else micro.old
                loss, s = policy_loss(logp, old_logp, micro.adv, mask, micro.n_tokens, ref_logp=micro.ref,
                                      sampler_logp=micro.sampler, **objective)
                acc.backward(loss * world)  # DDP averages over ranks: * world makes it a sum
                # what the step logs: the loss's sums, and in the first epoch the trainer's gap to the sampler
                gap = sampler_gap(old_logp, micro.rollouts, args.variant, run.tags) if epoch == 0 else {}
                stats.update(s, loss=loss.item(), **gap)
            # a non-finite gradient norm (the same on every rank) skips the update; 3 in a row stop the run, below
            finite = bool(torch.isfinite(acc.clip_grad_norm_(model.parameters(), 1.0)))
            if finite:
                opt.step()
            opt.zero_grad(set_to_none=True)
            skipped = 0 if finite else skipped + 1
            stats.update(skipped_updates=int(not finite))
        # 7) log (reduced over ranks), keep a few rollouts, evaluate, checkpoint
        row = metrics.step_row(acc, step, rollouts, grades, zero_groups, len(idx), stats, t0, t_rollout)
        row.update(run.cache.stats())  # CUDA graphs: how many, their memory pool, capture time, a failure
        # a few rollouts as readable rows (sample.py --show prints them as trees)
        kept = zip(rollouts[:args.log_rollouts], grades, golds)
        logs.log_rollouts(acc, out / "rollouts.jsonl", [rollout_row(r, tokenizer, g, gold, step)
                                                              for r, g, gold in kept])
        # --eval-every: the benchmark set, sampled by the sampling copy of the weights just trained
        if args.eval_every and step % args.eval_every == 0:
            refresh_copy(run.sampler_model, acc.unwrap_model(model))
            row.update(run_eval(run, args, acc, step))
        logs.log_metrics(acc, out, row)
        if skipped >= 3:
            raise UsageError(f"step {step}: {skipped} updates in a row had a non-finite loss or gradient norm: "
                             f"stopped (the last checkpoint in {out} is kept)")
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}", par=f"{row['parallel_rate']:.2f}")
        bar.update()
        if step % args.save_every == 0 or step == args.steps:  # every rank (FSDP gathers)
            checkpoint.save_checkpoint(out, step, acc, model, tokenizer, args, args.keep_checkpoints)
    # every rank done before the process group goes down
    bar.close()
    acc.wait_for_everyone()
    acc.end_training()
    acc.print(f"done: {step} steps, model in {out}")

# the pieces main() calls


Reference = namedtuple("Reference", "model context")  # the KL reference: a model, run under context()


def prepare(args, acc):
    """What main() trains with, one namespace: problems, policy, optimizer, reference, sampling copy, KV cache."""
    run = SimpleNamespace(reference=None, eval_problems=())  # (the rest is set below)
    cuda, world = acc.device.type == "cuda", acc.num_processes
    run.template = recipes.template(args.prompt_file, args.preset == "toy")
    # the problems, enough of them for a step that splits evenly over mini-batches and processes
    problems = data.training_problems(args.data, args.seed + 1, args.data_dir, args.data_split,
                                      config=args.data_config, question_key=args.question_key,
                                      answer_key=args.answer_key)
    if args.prompts_per_step > len(problems):
        raise UsageError(f"--prompts-per-step {args.prompts_per_step}: more than the {len(problems)} problems "
                         f"of {args.data}")
    if args.prompts_per_step % (world * args.mini_batches):
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} must divide into --mini-batches "
                         f"{args.mini_batches} over {world} processes")
    init = checkpoint.model_dir(args.init)  # a run dir: its newest valid checkpoint
    model, run.tokenizer = load_model(init, "bfloat16" if cuda and args.lora else "float32")  # LoRA: bf16
    # each problem's prompt ids (a record's own chat as it is); prompts over --max-prompt-tokens are left out
    prompt = lambda r: data.prompt_ids(run.tokenizer, run.template, r)
    prompts = [prompt(r) for r in problems]
    keep = [i for i, q in enumerate(prompts) if len(q) <= args.max_prompt_tokens]  # longer ones: left out
    if len(keep) < len(prompts):
        acc.print(f"{len(prompts) - len(keep)} prompts are longer than --max-prompt-tokens: left out")
    if len(keep) < args.prompts_per_step:
        raise UsageError(f"only {len(keep)} prompts fit --max-prompt-tokens {args.max_prompt_tokens}")
    run.problems, run.prompts = [problems[i] for i in keep], [prompts[i] for i in keep]
    if args.eval_every:  # --eval-every samples with the run's KV cache: sized for these prompts too
        run.eval_problems = data.load_problems(args.eval_data, "test", args.data_dir)[:args.eval_limit]
    # the longest prompt sizes the KV cache's columns (below)
    longest = max(len(q) for q in run.prompts + [prompt(r) for r in run.eval_problems])
    run.tags, run.pad = tag_ids(run.tokenizer), run.tokenizer.pad_token_id
    # the policy and its optimizer; the frozen reference (LoRA: the policy with its adapter switched off)
    if args.lora:
        model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r)
    if args.grad_ckpt:  # (a CPU too: a 135M model's 2,048-token step peaks at 3.6 GB without, 1.1 GB with)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.kl_coef > 0 and not args.lora:  # a copy in the policy's precision: the KL starts at 0
        run.reference = Reference(sampling_copy(model, next(model.parameters()).dtype, acc.device), nullcontext)
        refresh_copy(run.reference.model, model)
    trained = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay, foreach=True)  # as on a GPU
    run.model, run.opt = acc.prepare(model, opt)
    run.model.train()
    if args.kl_coef > 0 and args.lora:
        run.reference = Reference(run.model, acc.unwrap_model(run.model).disable_adapter)
    # the sampling copy (bf16 on a GPU), and the KV cache: on a GPU, what a measured training step leaves
    dtype = torch.bfloat16 if cuda else torch.float32
    run.sampler_model = sampling_copy(acc.unwrap_model(run.model), dtype, acc.device)
    run.cache = kv_cache_for_run(acc, run.model, run.opt, run.tags, run.pad, longest, max_rows=args.max_rows,
                                 **memory_flags(args))
    return run


def run_eval(run, args, acc, step):
    """The --eval-every hook: every rank's share with the run's KV cache; the summary on every rank. It
    grades as the benchmarks are graded (dapo; the toy: the run's grader)."""
    grader = rewards.resolve(args.grader if args.preset == "toy" else "dapo", "grader")
    rows, summary = evaluate_everywhere(
        run.sampler_model, run.tokenizer, run.eval_problems, args.eval_n, gather_object, acc.process_index,
        acc.num_processes, template=run.template, seed=args.seed, cache=run.cache, variant=args.variant,
        grader=grader, max_new_tokens=args.max_new_tokens, num_paths=args.num_paths, max_blocks=args.max_blocks,
        rules=args.rules, path_max_tokens=args.path_max_tokens, reserve=args.answer_reserve)
    logs.append_rows(acc, Path(args.out) / "eval_rollouts.jsonl", [dict(r, step=step) for r in rows])
    return {f"eval_{k}": v for k, v in summary.items() if isinstance(v, (int, float))}


def parse_args(argv=None):
    """Flags, the preset's and the (stage, variant) recipe's defaults; every check that needs no file."""
    args = recipes.parse(parser, argv, "train_rl")
    # the (stage, variant) recipe fills whatever was not given
    for k, v in recipes.recipe(args.stage, args.variant, args.preset == "toy").items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.clip_high is None:
        args.clip_high = recipes.clip_high(args.reward)
    args.run_name = args.run_name or Path(args.out).name
    if args.resume:  # the run's own flags, before anything reads them (typed again: applied or refused)
        checkpoint.resume_args(args.out, args, REFUSE, APPLY)
    # every number in its range (one line each); then what ranges alone cannot say
    recipes.check_ranges(args, parser, dict(
        group_size=(2, "GRPO compares a prompt's rollouts"), num_paths=(2, "a block has 2 or more paths"),
        temperature=(0.0, "RL samples"), top_p=0.0, max_new_tokens=1, max_prompt_tokens=1,
        path_max_tokens=(2, "its two tags"), prompts_per_step=1, steps=1, save_every=1, keep_checkpoints=1,
        ppo_epochs=1, mini_batches=1, micro_batch_tokens=1, max_rows=(args.num_paths, "one rollout's paths"),
        lr=0.0, dual_clip=1.0, tis_cap=(1, "a cap below 1 down-weights on-policy tokens"), eval_n=1, lora_r=1,
        max_blocks=1, kv_memory_gb=0.0, gpu_memory_gb=0.0, num_gpus=1, eval_limit=1))
    for ok, message in [
            (args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
            (max(args.clip_low, args.clip_high) < 1, "--clip-low and --clip-high must be below 1"),
            (args.mini_batches <= args.prompts_per_step, "--mini-batches: more than the prompts of a step"),
            (args.answer_reserve is None or args.rules == "reserve", "--answer-reserve needs --rules reserve")]:
        if not ok:
            raise UsageError(message)
    recipes.check_out(args.out)  # a file in the way: one line, before anything loads
    recipes.check_tracker(args.report_to)
    rewards.resolve(args.reward, "reward"), rewards.resolve(args.grader, "grader")  # a typo: one line, now
    return args


def memory_flags(args):
    """The flags that size a run's memory, as plan.plan_for's keywords (--plan's, the KV cache's)."""
    return dict(gpu_memory_gb=args.gpu_memory_gb, num_gpus=args.num_gpus, lora_r=args.lora_r if args.lora else 0,
                grad_ckpt=args.grad_ckpt is not False, micro_batch_tokens=args.micro_batch_tokens,
                unseen=args.variant == "unseen", reference=args.kl_coef > 0 and not args.lora,
                rollouts=args.prompts_per_step * args.group_size, max_new_tokens=args.max_new_tokens,
                num_paths=args.num_paths, kv_memory_gb=args.kv_memory_gb)


def plan_or_train(argv=None):
    """--plan: the memory plan from the model config alone; else the run."""
    args = parse_args(argv)
    if not args.plan:
        return main(args)
    from nanopr1.plan import load_config, plan_for
    print(f"memory plan per GPU: {args.init}, {'LoRA' if args.lora else 'full fine-tune'}\n"
          f"{plan_for(load_config(args.init), max_prompt_tokens=args.max_prompt_tokens, **memory_flags(args))}")


if __name__ == "__main__":
    run_script(plan_or_train, checkpoint.release)
