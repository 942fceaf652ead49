"""
eval.py: Mean@n, unbiased Pass@k, parallel rate, format-valid rate and response length on benchmark
sets: n rollouts per problem from the branching sampler, graded as in RL (defaults: the paper's).

    python eval.py --preset toy                     # the newest toy model on toy-easy and toy-hard
    python eval.py --model Qwen/Qwen3-4B-Base --datasets aime25,aime24,amc23,math300
    python eval.py --model out/rl-hard --no-parallel --data-dir ../shared/data   # sequential
    accelerate launch eval.py --model out/rl-hard   # or torchrun; the problems split over the GPUs
    python eval.py --model out/rl-hard --datasets official_apo_test_v3.parquet   # the official file

A file in verl's layout (a `data_source` column, each record's `prompt` a chat that already holds the
instruction and the problem, as the official eval file) is read as the official protocol: a table
row per data_source, the records of one prompt grouped as one problem, their count its n (16 copies:
Mean@16 and Pass@16 over 16 rollouts; one copy: Mean@1), the chat sent as it is (no template around
it). Elsewhere n is 16, 1 on math300; --n sets it everywhere (spelled --rollouts under torchrun,
which takes --n for itself).

Two graders side by side: --grader (default dapo, the paper's strict one, which reads the last
`Final Answer:` of the whole response) decides `correct`, the paired differences and the bar charts;
--lenient-grader (default is_equiv, a numeric normaliser of the main line's answer) adds its columns,
so the gap between them is the share of a score that is formatting.

OUT/<model>-<hash of its path>/ holds each dataset's rollouts, summary.json and keys.json; a killed
run resumes (docs/design.md, "Evaluation"). Simplifications relative to the paper:
1. a grader is a Python function (math-verify plugs in as one: --grader module:function);
2. the weights are identified by file sizes, times and their first and last MiB, not a full hash;
3. --batch-size is not in the key: a problem's rollouts draw from its own seed whatever the batch.
"""

import argparse
import hashlib
import json
import re
import sys
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from nanopr1 import UsageError, data, kvcache, recipes, rewards, run_script
from nanopr1.checkpoint import model_dir
from nanopr1.evaluation import complete_rows, evaluate, format_table, paired_difference, summarize
from nanopr1.rollout import Options

# the options handed to sampler.sample as they are (and recorded in each dataset's key)
SAMPLING = ("temperature", "top_p", "max_new_tokens", "num_paths", "max_blocks", "variant")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Mean@n / Pass@k / parallel rate on benchmarks")
    arg = parser.add_argument
    arg("--preset", choices=["toy"], help="toy: CPU toy world (toy model, toy-easy,toy-hard, n 4)")
    # model
    arg("--model", help="hub id or local dir; several, comma-separated: one table (toy: newest)")
    arg("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, else float32)")
    arg("--device", help="default: the process's accelerator (cuda under accelerate launch) or cpu")
    arg("--variant", default="seen", choices=["seen", "unseen"], help="how paths are merged")
    # data
    arg("--datasets", default="aime25,aime24,amc23,math300",
        help="comma-separated names or files (a file with a data_source column: a set per source)")
    arg("--data-dir", default=None, help="read the named sets from local files here (offline)")
    arg("--question-key", help="the question column of your file (default: found by name)")
    arg("--answer-key", help="the gold answer column of your file (default: found by name)")
    arg("--limit", type=int, default=None, help="only the first N problems of each set")
    # sampling
    arg("--n", "--rollouts", type=int, help="rollouts per problem (16; math300: 1; torchrun: --rollouts)")
    arg("--temperature", type=float, default=1.0)
    arg("--top-p", type=float, default=1.0)
    arg("--max-new-tokens", type=int, default=3000, help="response budget, paths included")
    arg("--num-paths", type=int, default=2, help="paths per parallel block")
    arg("--max-blocks", type=int, default=4, help="parallel blocks per rollout at most")
    arg("--no-parallel", action="store_true", help="sequential baseline: plain prompt, no forking")
    arg("--prompt-file", help="a prompt template with a {problem} slot")
    arg("--grader", help="dapo (the default; toy: is_equiv), is_equiv, gsm8k or module:function")
    arg("--lenient-grader", default="is_equiv", help="a second grader beside --grader (none: off)")
    arg("--batch-size", type=int, default=4, help="problems per sampler call (x n rollouts)")
    arg("--seed", type=int, default=0)
    # output
    arg("--out", default="out/eval", help="output directory; each model gets a sub-directory")
    arg("--no-progress", action="store_true", help="no progress bar")
    args = recipes.parse(parser, argv, "eval")
    if args.preset == "toy" and not args.model:
        args.model = recipes.latest_toy_model()  # None if there is none yet
    # a mistake costs a line here, not a model load and a half-written OUT
    for ok, message in [
            (args.temperature != 0, "--temperature 0 is greedy decoding: n identical rollouts are not "
             "a Mean@n; use a positive temperature (the paper's is 1.0)"),
            (args.temperature > 0, f"--temperature {args.temperature}: must be positive"),
            (0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
            (args.model or args.preset != "toy",
             "no toy model yet: run `python train_sft.py --preset toy` first"),
            (args.model, "--model is required (a hub id or a local directory)")]:
        if not ok:
            raise UsageError(message)
    # every count in its range, one line each (a parallel block needs two paths, a sequential run none)
    least_paths = 0 if args.no_parallel else (2, "paths in a parallel block; or pass --no-parallel")
    recipes.check_ranges(args, parser, dict(n=(1, "rollouts per problem"), max_new_tokens=1,
                                            batch_size=1, limit=1, num_paths=least_paths))
    recipes.check_out(args.out)
    # the paper's grader; the toy's answers are bare numbers, which the lenient grader reads
    args.grader = args.grader or ("is_equiv" if args.preset == "toy" else "dapo")
    if args.lenient_grader in ("none", args.grader):
        args.lenient_grader = None  # no second column (the same grader twice says nothing)
    # (name, function) of each grader, resolved now: a typo is one line, before any model loads
    args.graders = [(g, rewards.resolve(g, "grader")) if g else None
                    for g in (args.grader, args.lenient_grader)]
    return args


def main(argv=None):
    args = parse_args(argv)
    # the data first: a typo in --datasets should not wait for a 4B model to load
    template = recipes.template(args.prompt_file, args.preset == "toy", args.no_parallel)
    sets, ns = load_sets(args)
    chats = [name for name, problems in sets.items() if any(p.get("chat") for p in problems)]
    if chats and (args.prompt_file or args.no_parallel):
        print(f"note: {', '.join(chats)}: the records' own chat prompts are sent as they are "
              "(--prompt-file and --no-parallel's prompt apply to bare questions)", file=sys.stderr)
    # one process per GPU (accelerate launch, torchrun); a merge may wait hours for the slowest rank
    timeout = InitProcessGroupKwargs(timeout=timedelta(hours=6))
    acc = Accelerator(cpu=args.device == "cpu", kwargs_handlers=[timeout])
    args.device = args.device or str(acc.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    # several models make one table (before/after a stage), each row named by its model's label
    models = args.model.split(",")
    labels = [Path(m).name for m in models]
    if len(set(labels)) < len(labels):  # a/model and b/model: the paths given
        labels = models
    table, rows = {}, {}
    for model, label in zip(models, labels):
        summaries, rows[label] = evaluate_model(model, args, sets, ns, template, acc)
        prefix = label + "/" if len(models) > 1 else ""
        table.update({prefix + k: v for k, v in summaries.items()})
    # the main process prints what was run (model, mode, n, sampling, graders), then the table
    if acc.is_main_process:
        values = sorted(set(ns.values()))
        n = f"n={values[0]}" if len(values) == 1 else "n " + ", ".join(f"{k} {v}" for k, v in ns.items())
        mode = "sequential" if args.no_parallel else "parallel, " + args.variant
        graders = args.grader + (f" (lenient: {args.lenient_grader})" if args.lenient_grader else "")
        print(f"{args.model} ({mode}), {n}, temperature {args.temperature}, "
              f"budget {args.max_new_tokens} tokens, graded by {graders}")
        print(format_table(table))
    # before/after: each later model against the first, paired over the same problems
    if acc.is_main_process and len(models) > 1:
        print(f"differences from {labels[0]}, paired over problems (± one standard error), in points:")
        points = lambda d: f"{100 * d.mean:+.1f} ± {100 * d.stderr:.1f}"
        for label in labels[1:]:
            for name in sets:
                a, b = rows[labels[0]][name], rows[label][name]
                d = {k: points(paired_difference(a, b, k)) for k in ("correct", "has_block")}
                print(f"  {label}/{name}: accuracy {d['correct']}   parallel {d['has_block']}")
    acc.wait_for_everyone()  # every rank done with the group before it goes down
    acc.end_training()
    return table


def evaluate_model(model_path, args, sets, ns, template, acc):
    """One model on this rank's share of every set: (summaries, rows) on the main process."""
    # OUT/<model name>[-sequential]-<hash of where it is>: two out/rl-hard do not collide
    path = Path(model_path).expanduser()
    where = str(path.resolve()) if path.exists() else model_path
    label = Path(model_path).name + ("-sequential" if args.no_parallel else "")
    out = Path(args.out) / f"{label}-{hashlib.sha256(where.encode()).hexdigest()[:6]}"
    from nanopr1.model import load_model  # looked up when called: a test's stand-in is used
    weights_dir = model_dir(model_path)  # a run dir: its newest checkpoint
    model, tokenizer = load_model(weights_dir, args.dtype, args.device)
    weights = fingerprint(weights_dir, model)
    # one KV cache for every batch of every set (its CUDA graphs kept), as large as one batch
    longest = max(len(data.prompt_ids(tokenizer, template, p)) for s in sets.values() for p in s)
    opts = Options(max_new_tokens=args.max_new_tokens, num_paths=args.num_paths,
                   parallel=not args.no_parallel)
    cache = kvcache.for_call(model, opts, [[0] * longest], args.batch_size * max(ns.values()), None)[0]
    keys, summaries, rows = {}, {}, {}
    for name, problems in sets.items():
        # the main process merges what an earlier run left (or drops it: other settings) ...
        n = ns[name]
        keys[name] = run_key(weights, args, template, n, problems)
        if acc.is_main_process:
            gather(out, name, n, keys[name])
        acc.wait_for_everyone()
        # ... each rank samples the problems of its share still to do, appending to its own file ...
        mine = out / f"{name}.rank{acc.process_index}.jsonl"
        evaluate(model, tokenizer, problems, n, template=template, parallel=not args.no_parallel,
                 batch_size=args.batch_size, done=data.read_rows(out / f"{name}.jsonl"),
                 on_rows=lambda new: data.write_rows(mine, new, "a"), progress=not args.no_progress,
                 desc=name, seed=args.seed, rank=acc.process_index, world=acc.num_processes, cache=cache,
                 grader=args.graders[0], lenient=args.graders[1],
                 **{k: getattr(args, k) for k in SAMPLING})
        acc.wait_for_everyone()
        # ... and the main process merges the rank files and summarises the set
        if acc.is_main_process:
            rows[name] = gather(out, name, n, keys[name])
            summaries[name] = summarize(rows[name], n)
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps({"keys": keys, "datasets": summaries}, indent=1))
        world = f"{acc.num_processes} processes" if acc.num_processes > 1 else "1 process"
        print(f"rollouts and summary.json in {out} ({world})", file=sys.stderr)
    return summaries, rows


# -----------------------------------------------------------------------------
# the bookkeeping: the datasets and their n, what identifies a run's rows, merging and resuming


def load_sets(args):
    """({name: problems}, {name: n}) of --datasets; a file in verl's layout: official_sets."""
    sets, ns = {}, {}
    for source in args.datasets.split(","):
        problems = data.load_problems(source, split="test", data_dir=args.data_dir,
                                      question_key=args.question_key, answer_key=args.answer_key)
        if problems and all(p.get("data_source") is not None for p in problems):
            found = official_sets(problems, source, args.n)
        else:  # named by its file's stem, with the paper's n (split "test" only matters for gsm8k)
            name = Path(source).stem
            found = {name: (problems, 1 if name == "math300" else 16)}
        for name, (problems, n) in found.items():
            if name in sets:
                raise UsageError(f"--datasets: two sets are named {name} (the name of a file is "
                                 "its stem; of an official file's set its data_source)")
            sets[name], ns[name] = problems[:args.limit], args.n or n
    return sets, ns


def official_sets(records, source, n=None):
    """{data_source: (problems, n)} of an official file: the records of one prompt are one problem,
    their count its n (16 copies: Mean@16); each problem keeps its first record."""
    by_source = {}
    for r in records:
        name = re.sub(r"[^\w.-]", "_", str(r["data_source"]))  # names a file in OUT
        prompt = json.dumps(r.get("chat") or r["question"], sort_keys=True)
        by_source.setdefault(name, {}).setdefault(prompt, []).append(r)
    found = {}
    for name, groups in by_source.items():
        # the copies of a prompt share one gold answer, and every prompt of a set has as many copies
        for copies in groups.values():
            golds = sorted({c["answer"] for c in copies})
            if len(golds) > 1:
                raise UsageError(f"{source}: a prompt of {name} has {len(golds)} gold answers "
                                 f"({', '.join(golds)})")
        counts = sorted({len(copies) for copies in groups.values()})
        if len(counts) > 1 and n is None:
            raise UsageError(f"{source}: the prompts of {name} repeat {counts[0]} to {counts[-1]} "
                             "times, so n is not one number: pass --n")
        found[name] = ([copies[0] for copies in groups.values()], counts[-1])
    return found


def fingerprint(path, model):
    """What identifies the weights of a model dir, cheaply (docs/design.md, "Evaluation"); of a hub
    id: its commit."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        commit = getattr(model.config, "_commit_hash", None)
        return f"{path}@{commit}" if commit else str(path)
    # each weight file by its name, size and time, and its first and last MiB
    h, mib = hashlib.sha256((path / "config.json").read_bytes()), 1 << 20
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        stat = f.stat()
        h.update(f"{f.name} {stat.st_size} {stat.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(mib))
            fh.seek(max(stat.st_size - mib, 0))
            h.update(fh.read(mib))
    return "sha256:" + h.hexdigest()[:16]


def run_key(weights, args, template, n, problems):
    """Everything that changes a dataset's rows. A resumed run must have the same key."""
    questions = json.dumps([[p.get("chat") or p["question"], p["answer"]] for p in problems]).encode()
    return {"weights": weights, "dtype": args.dtype, "seed": args.seed, "template": template,
            "grader": args.grader, "lenient_grader": args.lenient_grader, "parallel": not args.no_parallel,
            **{k: getattr(args, k) for k in SAMPLING}, "n": n, "limit": args.limit,
            "problems": hashlib.sha256(questions).hexdigest()[:16]}


def gather(out, name, n, key):
    """Main process: the complete problems of OUT/<name>.jsonl and the rank files, merged into it;
    none if they were sampled under another key (the key of each dataset: OUT/keys.json)."""
    out.mkdir(parents=True, exist_ok=True)
    merged, ranks = out / f"{name}.jsonl", sorted(out.glob(f"{name}.rank*.jsonl"))
    rows = [r for f in [merged] + ranks for r in data.read_rows(f)]
    keys_file = out / "keys.json"
    keys = json.loads(keys_file.read_text()) if keys_file.is_file() else {}
    stored = keys.get(name)
    if rows and stored != key:
        changed = [k for k in key if stored.get(k) != key[k]] if stored else ["no key stored"]
        print(f"{out}: {name} was evaluated with other settings ({', '.join(changed)}): "
              "recomputing", file=sys.stderr)
        rows = []
    # half-done problems and torn lines dropped; the rank files live on in the merged one
    rows = complete_rows(rows, n)
    data.write_rows(merged, rows)
    for f in ranks:
        f.unlink()
    keys_file.write_text(json.dumps({**keys, name: key}, indent=1))
    return rows


if __name__ == "__main__":
    run_script(main)
