"""
eval.py: how often a model solves benchmark problems, and how often it thinks in parallel.

n rollouts per problem from the branching sampler (the paper's settings: temperature 1.0, top-p
1.0, 3000 tokens, 2 paths; n = 1 on MATH300, 16 elsewhere), graded as in RL. Per dataset: Mean@n,
unbiased Pass@k (k = 1, 2, 4, ..., n), the parallel rate (rollouts with a valid block), the
format-valid rate and the mean response length in tokens.

    python eval.py --preset toy                       # the newest toy model on toy-easy and toy-hard
    python eval.py --model Qwen/Qwen3-4B-Base --datasets aime25,aime24,amc23,math300
    python eval.py --model out/rl-hard --data-dir ../shared/data     # local copies of the sets
    python eval.py --model out/rl-hard --no-parallel                 # sequential prompt and sampling
    accelerate launch eval.py --model out/rl-hard                    # the problems split over the GPUs
    torchrun --nproc_per_node 8 eval.py --model out/rl-hard --rollouts 4   # the same (--n is torchrun's)

Each model writes OUT/<model>-<hash of its path>/ (--out, default out/eval): the rollouts of each
dataset, summary.json and keys.json. A killed run resumes, with any number of processes, if
nothing that changes the rows changed (docs/design.md, "Evaluation").

Simplifications relative to the paper:
1. The built-in grader is a small numeric normaliser (nanopr1/rewards.py), not math-verify
   (--grader plugs one in).
2. The weights are identified by file sizes, times and their first and last MiB, not a full hash.
3. --batch-size is not in the key: a problem's rollouts draw from its own seed whatever the batch
   (on a GPU, batched kernels may still change the last bits).
"""

import argparse
import hashlib
import json
import sys
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from nanopr1 import UsageError, data, recipes, rewards, toy
from nanopr1.checkpoint import model_dir
from nanopr1.evaluation import complete_rows, evaluate, format_table, merge, paired_difference, summarize

MEAN_AT = {"math300": 1}  # the paper's n where it is not 16: MATH300 is reported as Mean@1
MIB = 1 << 20

# -----------------------------------------------------------------------------
# resume files: rows, keys, one directory per model


def local_dir(model_path):
    """The directory the model loads from (a run dir: its checkpoint), or None for a hub id."""
    path = Path(model_path).expanduser()
    path = model_dir(path) if path.exists() else path
    return path.resolve() if (path / "config.json").is_file() else None


def out_dir(args, model_path):
    """OUT/<model name>[-sequential]-<hash of where it is>: out/rl-hard of two runs do not collide."""
    where = str(Path(model_path).expanduser().resolve() if local_dir(model_path) else model_path)
    name = Path(model_path.rstrip("/")).name + ("-sequential" if args.no_parallel else "")
    return Path(args.out) / f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:6]}"


def fingerprint(model_path, model):
    """What identifies the weights, cheaply at 8 GB: config.json, each weight file's size, mtime,
    first and last MiB (new weights at the same path change it); a hub id's resolved commit."""
    path = local_dir(model_path)
    if path is None:
        commit = getattr(model.config, "_commit_hash", None)
        return f"{model_path}@{commit}" if commit else model_path
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        stat = f.stat()
        h.update(f"{f.name} {stat.st_size} {stat.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(MIB))
            fh.seek(max(stat.st_size - MIB, 0))
            h.update(fh.read(MIB))
    return "sha256:" + h.hexdigest()[:16]


def run_key(weights, args, template, sampling, n, problems):
    """Everything that changes a dataset's rows. A resumed run must have the same key."""
    questions = json.dumps([[p["question"], p["answer"]] for p in problems]).encode()
    return {"weights": weights, "dtype": args.dtype, "seed": args.seed, "template": template,
            "grader": args.grader, "parallel": not args.no_parallel, **sampling, "n": n,
            "limit": args.limit, "problems": hashlib.sha256(questions).hexdigest()[:16]}


def start(out, name, key, problems, n):
    """Main process, before any rank samples: gather the complete problems of earlier runs (the
    merged file and every rank file, whatever the world size) into OUT/<name>.jsonl, if same key."""
    keys_file, merged = out / "keys.json", out / f"{name}.jsonl"
    keys = json.loads(keys_file.read_text()) if keys_file.is_file() else {}
    ranks = sorted(out.glob(f"{name}.rank*.jsonl"))
    old = [r for f in [merged] + ranks if f.is_file() for r in data.read_rows(f)]
    if old and keys.get(name) != key:
        changed = ["no key stored"]
        if name in keys:
            changed = [k for k in key if keys[name].get(k) != key[k]]
        print(f"{out}: {name} was evaluated with other settings ({', '.join(changed)}): recomputing",
              file=sys.stderr)
        old = []
    data.write_rows(merged, complete_rows(old, problems, n))  # half-done problems, torn lines dropped
    for f in ranks:
        f.unlink()
    keys_file.write_text(json.dumps({**keys, name: key}, indent=1))


def finish(out, name, problems, n):
    """Main process, after every rank is done: all rows of the dataset in one file, sorted."""
    merged, ranks = out / f"{name}.jsonl", sorted(out.glob(f"{name}.rank*.jsonl"))
    rows = [r for f in [merged] + ranks for r in data.read_rows(f)]
    rows = merge([complete_rows(rows, problems, n)])
    data.write_rows(merged, rows)
    for f in ranks:
        f.unlink()
    return rows

# -----------------------------------------------------------------------------
# the script


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Mean@n / Pass@k / parallel rate on benchmark sets")
    arg = parser.add_argument
    arg("--preset", choices=["toy"], help="toy: CPU toy world (toy model, toy-easy,toy-hard, n 4)")
    # model
    arg("--model", help="hub id or local dir; several, comma-separated, give one table "
        "(toy preset: the newest of out/toy-*)")
    arg("--dtype", help="float32 | bfloat16 | float16 (default: bfloat16 on cuda, else float32)")
    arg("--device", help="default: this process's accelerator (cuda under accelerate launch) or cpu")
    arg("--variant", default="seen", choices=["seen", "unseen"], help="how paths are merged")
    # data
    arg("--datasets", default="aime25,aime24,amc23,math300", help="comma-separated names or files")
    arg("--data-dir", default=None, help="read the named sets from local files here (offline)")
    arg("--limit", type=int, default=None, help="only the first N problems of each set")
    # sampling
    arg("--n", "--rollouts", type=int, default=None, help="rollouts per problem, every dataset "
        "(default: the paper's, 1 on math300 and 16 elsewhere; under torchrun spell it --rollouts: "
        "torchrun takes --n for an abbreviation of its own flags)")
    arg("--temperature", type=float, default=1.0)
    arg("--top-p", type=float, default=1.0)
    arg("--max-new-tokens", type=int, default=3000, help="response budget (paths, summaries, answer)")
    arg("--num-paths", type=int, default=2, help="paths per parallel block")
    arg("--max-blocks", type=int, default=4, help="parallel blocks per rollout at most")
    arg("--no-parallel", action="store_true", help="sequential baseline: plain prompt, no forking")
    arg("--prompt-file", help="a prompt template with a {problem} slot")
    arg("--grader", default="is_equiv", help="is_equiv (the built-in) or module:function, e.g. math-verify")
    arg("--batch-size", type=int, default=4, help="problems per sampler call (x n rollouts)")
    arg("--seed", type=int, default=0)
    # output
    arg("--out", default="out/eval", help="output directory; each model gets a sub-directory")
    arg("--no-progress", action="store_true", help="no progress bar")
    args = recipes.parse(parser, argv, "eval")
    # a mistake costs a line here, not a model load and a half-written OUT
    checks = [
        (args.n is not None and args.n < 1, f"--n {args.n}: at least 1 rollout per problem"),
        (args.temperature < 0, f"--temperature {args.temperature}: must be positive"),
        (args.temperature == 0, "--temperature 0 is greedy decoding: n identical rollouts are not a "
                                "Mean@n; use a positive temperature (the paper's is 1.0)"),
        (not 0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
        (not args.no_parallel and args.num_paths < 2,
         f"--num-paths {args.num_paths}: a parallel block needs at least 2 paths (or pass --no-parallel)"),
        (args.max_new_tokens < 1, f"--max-new-tokens {args.max_new_tokens}: must be at least 1"),
        (args.batch_size < 1, f"--batch-size {args.batch_size}: must be at least 1"),
        (args.limit is not None and args.limit < 1, f"--limit {args.limit}: must be at least 1"),
    ]
    for bad, message in checks:
        if bad:
            raise UsageError(message)
    rewards.resolve(args.grader, "grader")  # a typo in --grader: one line, before any model loads
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.model and args.preset == "toy":
        args.model = toy.latest_model()
        if args.model is None:
            raise UsageError("no toy model yet: run `python train_sft.py --preset toy` first")
    if not args.model:
        raise UsageError("--model is required (a hub id or a local directory)")
    try:  # the data first: a typo in --datasets should not wait for a 4B model to load
        template = recipes.template(args)
        # keyed by a short label (a file's stem); split "test" only matters for gsm8k
        sets = {Path(name).stem: data.load(name, split="test", data_dir=args.data_dir)[:args.limit]
                for name in args.datasets.split(",")}
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    ns = {name: args.n or MEAN_AT.get(name, 16) for name in sets}
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    num_paths=args.num_paths, max_blocks=args.max_blocks, variant=args.variant)
    # the ranks wait for the slowest one's share at each merge: longer than the default timeout
    timeout = InitProcessGroupKwargs(timeout=timedelta(hours=6))
    acc = Accelerator(cpu=args.device == "cpu", kwargs_handlers=[timeout])
    args.device = args.device or str(acc.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    models = args.model.split(",")  # several models: one table, e.g. before/after a stage
    labels = [Path(m.rstrip("/")).name for m in models]
    if len(set(labels)) < len(labels):  # a/model and b/model: the paths given
        labels = models
    table, rows = {}, {}
    for model, label in zip(models, labels):
        summaries, rows[label] = evaluate_model(model, args, sets, ns, template, sampling, acc)
        prefix = label + "/" if len(models) > 1 else ""
        table.update({prefix + k: v for k, v in summaries.items()})
    if acc.is_main_process:
        values, per_set = sorted(set(ns.values())), ", ".join(f"{k} {v}" for k, v in ns.items())
        n = f"n={values[0]}" if len(values) == 1 else f"n {per_set}"
        mode = "sequential" if args.no_parallel else "parallel, " + args.variant
        print(f"{args.model} ({mode}), {n}, temperature {args.temperature}, "
              f"budget {args.max_new_tokens} tokens")
        print(format_table(table))
        if len(models) > 1:  # before/after: the differences, paired over the same problems
            print(f"differences from {labels[0]}, paired over problems (± one standard error), in points:")
            points = lambda d: f"{100 * d.mean:+.1f} ± {100 * d.stderr:.1f}"
            for label in labels[1:]:
                for name in sets:
                    a, b = rows[labels[0]][name], rows[label][name]
                    accuracy = points(paired_difference(a, b, "correct"))
                    parallel = points(paired_difference(a, b, "has_block"))
                    print(f"  {label}/{name}: accuracy {accuracy}   parallel {parallel}")
    acc.end_training()  # the process group down before exit
    return table


def kv_cache(model, tokenizer, template, sets, ns, args):
    """One KV cache for every batch of every set (its CUDA graphs kept): columns for the longest
    prompt of all sets + the budget, rows for one batch's rollouts (fewer if the GPU holds fewer)."""
    from nanopr1.format import chat_prompt_ids
    from nanopr1.kvcache import KVCache, free_bytes, rows_for_budget
    questions = [p["question"] for ps in sets.values() for p in ps]
    longest = max(len(chat_prompt_ids(tokenizer, template, q)) for q in questions)
    need = 1 if args.no_parallel else args.num_paths  # the rows of one rollout
    cols, rows = longest + args.max_new_tokens + 1, args.batch_size * max(ns.values()) * need
    budget = free_bytes(model.device)
    if budget is not None:
        rows = min(rows, rows_for_budget(model.config, model.dtype, cols, budget))
    if rows < need:
        raise UsageError(f"{budget / 1e9:.1f} GB of free GPU memory hold {rows} KV cache rows of "
                         f"{cols} columns, one rollout needs {need}: lower --max-new-tokens")
    return KVCache(rows, cols, model.device)


def evaluate_model(model_path, args, sets, ns, template, sampling, acc):
    """Evaluate one model on this rank's share of every set; the main process merges the ranks'
    rollouts, writes summary.json and returns (summaries, rows), the other ranks ({}, {})."""
    out = out_dir(args, model_path)
    try:
        from nanopr1.model import load
        model, tokenizer = load(model_path, args.dtype, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    weights = fingerprint(model_path, model)
    cache = kv_cache(model, tokenizer, template, sets, ns, args)
    keys, summaries, rows = {}, {}, {}
    for name, problems in sets.items():
        n = ns[name]
        keys[name] = run_key(weights, args, template, sampling, n, problems)
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            start(out, name, keys[name], problems, n)
        acc.wait_for_everyone()
        mine = out / f"{name}.rank{acc.process_index}.jsonl"
        evaluate(model, tokenizer, problems, n, template=template, parallel=not args.no_parallel,
                 batch_size=args.batch_size, done=data.read_rows(out / f"{name}.jsonl"),
                 on_rows=lambda new: data.write_rows(mine, new, "a"), progress=not args.no_progress,
                 desc=name, seed=args.seed, rank=acc.process_index, world=acc.num_processes,
                 cache=cache, grader=rewards.resolve(args.grader, "grader"), **sampling)
        acc.wait_for_everyone()
        if acc.is_main_process:
            rows[name] = finish(out, name, problems, n)
            summaries[name] = summarize(rows[name], n)
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps({"keys": keys, "datasets": summaries}, indent=1))
        world = f"{acc.num_processes} processes" if acc.num_processes > 1 else "1 process"
        print(f"rollouts and summary.json in {out} ({world})", file=sys.stderr)
    return summaries, rows


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"error: {e}")
