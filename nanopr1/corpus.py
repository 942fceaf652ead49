"""
The cold-start corpus (`train_sft.py --generate`): a teacher writes one trace per problem, kept if well
formed, with a block and correct (data.judge_trace). Problem i is sampled on rank i % world with seed
`seed` + i; each rank appends its decisions to <out>.rank<r>.jsonl, so a rerun resumes; rank 0 merges
them into <out> and <out>.meta.json (docs/design.md, "The cold-start corpus").
"""

import glob
import hashlib
import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from nanopr1 import UsageError, data, kvcache, sampler
from nanopr1.checkpoint import model_dir
from nanopr1.model import load_model
from nanopr1.rollout import Options


def _replace(path, text):  # written aside and renamed: a kill leaves the old file whole
    Path(f"{path}.tmp").write_text(text, encoding="utf-8")
    Path(f"{path}.tmp").replace(path)


def generate(acc, template, out, source, teacher, seed, max_new_tokens, batch, data_dir=None, overwrite=False):
    """Write the corpus of `source`'s problems at `out` with `teacher` (a model dir or hub id), resuming an
    earlier one made with the same settings (--overwrite: replacing any)."""
    world, rank = acc.num_processes, acc.process_index
    procs = f"{world} process{'es' if world > 1 else ''}"
    out, meta_file = Path(out), Path(f"{out}.meta.json")
    rank_files = lambda: sorted(out.parent.glob(glob.escape(out.name) + ".rank*.jsonl"))
    problems = data.load_problems(source, split="train", data_dir=data_dir)
    digest = lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]
    settings = {"source": source, "teacher": teacher, "seed": seed, "prompt": digest(template),
                "max_new_tokens": max_new_tokens,
                "problems": digest([[r["question"], r["answer"], *([r["chat"]] if "chat" in r else [])]
                                    for r in problems])}

    # 1) an earlier corpus at `out`: resumed if made with these settings, else refused (or --overwrite)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    if (out.is_file() or meta or rank_files()) and not overwrite and (meta or {}).get("settings") != settings:
        changed = meta and ", ".join(k for k in settings if meta["settings"].get(k) != settings[k])
        differs = f"other settings ({changed})" if meta else f"unknown settings (no {meta_file.name})"
        raise UsageError(f"{out} holds a corpus generated with {differs}: pass --overwrite to replace it, "
                         f"or another --data")
    acc.wait_for_everyone()  # every rank has looked before rank 0 deletes or writes anything
    if acc.is_main_process and (overwrite or meta is None):
        for f in [out, meta_file, *rank_files()]:
            f.unlink(missing_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        _replace(meta_file, json.dumps({"settings": settings, "rejected": []}))
    acc.wait_for_everyone()

    # 2) the decisions of earlier runs: kept in <out>, rejected in the meta file, any in rank files
    old = data.read_rows(out) + json.loads(meta_file.read_text())["rejected"]
    decided = {r["index"]: r for r in old + [r for f in rank_files() for r in data.read_rows(f)]}
    todo = [i for i in range(rank, len(problems), world) if i not in decided]  # this rank's share of the rest
    acc.print(f"{len(decided)}/{len(problems)} problems decided before; "
              f"sampling {len(problems) - len(decided)} on {procs}")
    acc.wait_for_everyone()  # every rank has read the files before any appends to them

    # 3) sample this rank's share, appending each batch's decisions as soon as they are made
    if todo:
        dtype = "bfloat16" if acc.device.type == "cuda" else "float32"
        model, tokenizer = load_model(model_dir(teacher), dtype, str(acc.device))
        prompt = lambda i: data.prompt_ids(tokenizer, template, problems[i])  # a record's own chat as it is
        longest = max(len(prompt(i)) for i in todo)
        options = Options(max_new_tokens=max_new_tokens, parallel=False)
        cache, _ = kvcache.for_call(model, options, [[0] * longest], batch, None)  # for every batch
        mine = Path(f"{out}.rank{rank}.jsonl")
        bar = tqdm(total=len(todo), desc="teacher", disable=not acc.is_main_process)
        with open(mine, "a", encoding="utf-8") as f:
            if f.tell() and not mine.read_bytes().endswith(b"\n"):
                f.write("\n")  # a line torn by a kill stays apart from the rows appended now
            for k in range(0, len(todo), batch):
                chunk = todo[k:k + batch]
                # a seed per problem: the same trace on any number of processes
                rollouts = sampler.sample(model, tokenizer, [prompt(i) for i in chunk], parallel=False,
                                          cache=cache, max_new_tokens=max_new_tokens, temperature=0.6,
                                          seed=[seed + i for i in chunk])
                for i, rollout in zip(chunk, rollouts):
                    gold = problems[i]["answer"]
                    response, why = data.judge_trace(rollout.text, gold, tokenizer)
                    row = {"index": i, "question": problems[i]["question"], "answer": gold, "response": response,
                           **{k: v for k, v in problems[i].items() if k == "chat"}}
                    f.write(json.dumps({"index": i, "rejected": why} if why else row) + "\n")
                f.flush()
                bar.update(len(chunk))
        bar.close()

    # 4) rank 0 merges every decision: the kept traces into <out>, the rejections into the meta file
    acc.wait_for_everyone()
    if acc.is_main_process:
        new = [r for f in rank_files() for r in data.read_rows(f) if r["index"] not in decided]
        rows = [r for _, r in sorted({**decided, **{r["index"]: r for r in new}}.items())]
        kept, rejected = [r for r in rows if "rejected" not in r], [r for r in rows if "rejected" in r]
        _replace(meta_file, json.dumps({"settings": settings, "rejected": rejected}))
        _replace(out, "".join(json.dumps(r) + "\n" for r in kept))
        for f in rank_files():
            f.unlink()
        reasons = dict(Counter(r["rejected"] for r in rejected).most_common())
        print(f"kept {len(kept)}/{len(problems)} ({len(kept) / max(len(problems), 1):.1%}) -> {out}; "
              f"rejected: {reasons}; {len(new)} sampled now on {procs}")
