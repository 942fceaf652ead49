"""Datasets as lists of {question, answer} records (other fields kept) from a name, a file or a hub
id (`load_problems`: docs/design.md, "Datasets"); the cold-start corpus's judge (`judge_trace`) and
token ids (`sft_examples`); the order of the RL problems."""

import json
import os
import re
from collections import Counter
from contextlib import suppress
from pathlib import Path

import torch

from nanopr1 import UsageError, offline_if_unreachable, toy
from nanopr1.attention import parse_blocks
from nanopr1.format import chat_ids, chat_prompt_ids, normalize, tag_ids
from nanopr1.rewards import reward_rollout
from nanopr1.rollout import make_rollout

# short name -> (hub id, config, split, file name in a --data-dir); only gsm8k's split is chosen
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "train", "gsm8k_{split}.jsonl"),  # answer: after '####'
    "dapo": ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train", "dapo_math_17k.jsonl"),  # unwrapped
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "eval_aime24.jsonl"),
    "aime25": ("math-ai/aime25", None, "test", "eval_aime25.jsonl"),
    "amc23": ("math-ai/amc23", None, "test", "eval_amc23.jsonl"),
    "math300": ("HuggingFaceH4/MATH-500", None, "test", "eval_math300.jsonl"),  # integer answers
}
TOY = ("toy-easy", "toy-hard")  # the toy world's held-out sets; toy:easy, toy:hard its training problems
QUESTION_KEYS = ("question", "problem", "prompt", "Question", "Problem", "messages")
ANSWER_KEYS = ("answer", "Answer", "ground_truth", "final_answer", "reward_model")
# DAPO's own instruction around each problem (our prompt is added later)
_DAPO_RE = re.compile(r"^Solve the following math problem.*?\n\n(.*)"
                      r"\n\nRemember to put your answer.*$", re.DOTALL)


def gsm8k_answer(solution):
    """The gold number of a GSM8K solution: the text after `####`, thousands separators dropped."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution without '#### n': {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _first(messages, role):
    """The text of the first `role` turn of a list of chat messages, or None."""
    return next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == role), None)


def _question(raw, keys=QUESTION_KEYS):
    """(question, chat) of a raw record: the first of `keys` that holds a question. A record whose
    question is a chat (verl's `prompt`, TRL's `messages`) keeps that chat up to its last user turn,
    to be sent as it is; DAPO's hub wrapper is the exception: its bare problem gets our template."""
    for key in keys:
        q, chat = raw.get(key), None
        if isinstance(q, list):  # chat messages: the question is the last user turn
            users = [i for i, m in enumerate(q) if isinstance(m, dict) and m.get("role") == "user"]
            chat, q = (q[:users[-1] + 1], q[users[-1]].get("content")) if users else (None, None)
        if isinstance(q, str) and q.strip():
            m = _DAPO_RE.match(q)
            return (m.group(1).strip(), None) if m else (q, chat)
    return None, None


def _answer(raw, keys=ANSWER_KEYS):
    """The gold answer of a raw record as a string, or None."""
    a = next((raw[k] for k in keys if raw.get(k) not in (None, "")), None)
    if isinstance(a, dict):  # verl's layout: reward_model = {"ground_truth": ..., "style": ...}
        a = a.get("ground_truth")
    if isinstance(a, list) and len(a) == 1:
        a = a[0]
    if isinstance(a, float) and a.is_integer():
        a = int(a)  # 27.0 -> "27"
    return None if a is None or str(a).strip() == "" else str(a).strip()


def _response(raw, key=None):
    """A teacher's response: `key`'s (default `response`), else the answer turn of TRL's `messages` /
    `completion`."""
    r, msgs, comp = raw.get(key or "response"), raw.get("messages"), raw.get("completion")
    if r is None and isinstance(msgs, list):
        users = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"]
        r = _first(msgs[max(users, default=-1) + 1:], "assistant")
    if r is None and comp is not None:
        r = _first(comp, "assistant") if isinstance(comp, list) else comp
    return r if isinstance(r, str) else None


def to_records(rows, source, response=False, question_key=None, answer_key=None, response_key=None):
    """Raw dicts -> {question, answer} records (and a teacher's `response`, for SFT); a UsageError names the
    row and columns."""
    keys = {"question": (question_key,) if question_key else QUESTION_KEYS,
            "answer": (answer_key,) if answer_key else ANSWER_KEYS,
            "response": (response_key,) if response_key else ("response", "messages", "completion")}
    out = []
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise UsageError(f"{source}: record {i} is a {type(raw).__name__}, not a JSON object")
        question, chat = _question(raw, keys["question"])
        chat = raw["chat"] if isinstance(raw.get("chat"), list) else chat  # a corpus row keeps its problem's
        record = dict(raw, question=question, answer=_answer(raw, keys["answer"]), **({"chat": chat} if chat else {}))
        if response:
            record["response"] = _response(raw, response_key)
        for what in ("question", "answer", "response") if response else ("question", "answer"):
            # SFT needs no gold answer
            if not isinstance(record[what], str) and not (what == "answer" and response):
                looked, found = ", ".join(keys[what]), ", ".join(map(str, raw)) or "nothing"
                raise UsageError(f"{source}: record {i} has no {what} column "
                                 f"(looked for {looked}; found: {found}): pass --{what}-key")
        if record["answer"] and "####" in record["answer"]:  # GSM8K: the answer is a whole solution
            record["solution"], record["answer"] = record["answer"], gsm8k_answer(record["answer"])
        out.append(record)
    return out


def read_file(path):
    """Raw dicts from a .jsonl / .json / .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {str(path)!r} does not exist")
    if path.suffix not in (".jsonl", ".json", ".parquet", ".txt", ""):
        raise UsageError(f"data file {str(path)!r}: a {path.suffix} file; use JSONL "
                         f"(one JSON object a line), a JSON list or parquet")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's: not parquet, truncated
            raise UsageError(f"data file {str(path)!r} could not be read as parquet ({e})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {str(path)!r} is not UTF-8 text (bad byte at offset "
                         f"{e.start}): re-save it as UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not a JSON list ({e.msg} at line {e.lineno})") from None
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): it splits at U+2028 too
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: line {n} is not JSON ({e.msg})") from None
    return rows


def read_hub(name, hub_id, config, split):
    """Raw dicts of a hub dataset; a clear message when the hub cannot be reached."""
    import datasets
    offline_if_unreachable()
    try:  # an iterable of dicts, not a list: the DAPO copy has ~1.8M rows
        return datasets.load_dataset(hub_id, config, split=split)  # config is load_dataset's `name`
    except Exception as e:  # offline, missing, gated, renamed: all end the same way for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        local = (HUB[name][3] if name in HUB else "FILE.jsonl").format(split=split)
        what = f"config {config}, split {split}" if config else f"split {split}"
        raise UsageError(f"dataset {name!r}: could not load {hub_id} ({what}) from the hub "
                         f"({first}). Offline? Put the records in a local JSONL/parquet file and "
                         f"pass --data-dir DIR (expects DIR/{local}) or the file path instead of "
                         f"the name") from None


def load_problems(source, split=None, data_dir=None, response=False, config=None, question_key=None,
                  answer_key=None, response_key=None, seed=0):
    """{question, answer, ...} records from a short name, a file or a hub id (see to_records)."""
    source = str(source)
    records = lambda rows, where: to_records(rows, where, response, question_key, answer_key, response_key)
    # the toy world's one entry: a held-out set (toy-easy, toy-hard), or 20,000 training problems (toy:easy,
    # toy:hard) drawn with `seed`
    if source in TOY or source.startswith("toy:"):
        level = source[4:]
        rows = toy.eval_set(level) if source in TOY else toy.problems(level, 20000, seed=seed)
        return records(rows, source)
    if source in HUB:
        hub_id, default_config, default_split, local = HUB[source]
        split = (split or default_split) if source == "gsm8k" else default_split
        if data_dir is not None:
            path = Path(data_dir) / local.format(split=split)
            if not path.is_file():
                raise UsageError(f"dataset {source!r}: {path} does not exist (with --data-dir, "
                                 f"{source} is read from {local.format(split=split)})")
            return records(read_file(path), f"{source} ({path})")
        rows = read_hub(source, hub_id, config or default_config, split)
        if source == "dapo":  # the hub copy repeats each problem ~100 times: keep the first copy
            keys, first = (question_key,) if question_key else QUESTION_KEYS, {}
            for raw in rows:  # streamed: the full list would not fit comfortably
                first.setdefault(_question(raw, keys)[0], raw)
            rows = list(first.values())
        out = records(rows, f"{source} ({hub_id})")
        if source == "math300":  # the integer-answer subset of MATH-500
            out = [r for r in out if re.fullmatch(r"-?\d+", r["answer"] or "")]
        return out
    if Path(source).suffix in (".jsonl", ".json", ".parquet") or Path(source).exists():
        return records(read_file(source), source)
    if "/" in source:
        return records(read_hub(source, source, config, split or "train"), source)
    raise UsageError(f"unknown dataset {source!r}: use one of {', '.join(list(HUB) + list(TOY))}, "
                     f"a .jsonl/.json/.parquet file, or a hub id owner/name")


def training_problems(source, seed=0, data_dir=None, split="train", **options):
    """Problems to train on: what load_problems reads (`options`: its keywords), never a held-out set."""
    if source in TOY:
        raise UsageError(f"--data {source} is the toy's held-out evaluation set; train on toy:{source[4:]}")
    return load_problems(source, split=split, data_dir=data_dir, seed=seed, **options)


def write_rows(path, rows, mode="w"):
    """Append rows (mode "a"), or replace the file: written aside, then renamed (kill-safe)."""
    tmp = Path(f"{path}.tmp") if mode == "w" else Path(path)
    with open(tmp, mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if mode == "w":  # on disk before the rename vouches for it
            f.flush()
            os.fsync(f.fileno())
    if mode == "w":
        tmp.replace(path)


def read_rows(path):
    """Rows of a JSONL file a run appends to (none if absent); a torn line (a kill) is skipped."""
    lines = Path(path).read_text(encoding="utf-8").split("\n") if Path(path).is_file() else []
    rows = []
    for line in lines:
        with suppress(json.JSONDecodeError):  # a torn line, or the empty one after the last
            rows.append(json.loads(line))
    return rows


_INDEX_RE = re.compile(r"^block at \d+: | (?:opened )?at \d+")  # token indices in a parser's reason


def reason_kind(reason):
    """The kind of a rejection, for counting: the reason without token indices, cut at ':'."""
    return _INDEX_RE.sub("", reason).split(":")[0]


def judge_trace(text, gold, tokenizer):
    """The paper's filter of a teacher's trace: (response, None) to keep it, else (None, why)."""
    response = normalize(text.split("</think>")[-1].strip())  # the teacher's thinking is dropped
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    rollout = make_rollout(tokenizer, [], ids, "budget")  # "budget": the last token is no EOS
    why = rollout.format_error
    if why is None and not rollout.blocks:
        why = "no parallel block"
    if why is None and not reward_rollout(rollout, gold)[1]["correct"]:
        why = "wrong final answer"
    return (response, None) if why is None else (None, reason_kind(why))


def sft_examples(rows, tokenizer, template, max_len):
    """(examples, dropped): rows as (prompt ids, response ids + EOS); the dropped, by kind."""
    tags, examples, dropped = tag_ids(tokenizer), [], Counter()
    for row in rows:
        prompt = prompt_ids(tokenizer, template, row)
        ids = tokenizer(normalize(row["response"]), add_special_tokens=False)["input_ids"]
        why = parse_blocks(ids, tags)[1]  # the token parser's reason, or None
        if why is None and len(prompt) + len(ids) + 1 > max_len:  # + EOS
            why = f"longer than --max-len {max_len}"
        if why is None:
            examples.append((prompt, ids + [tokenizer.eos_token_id]))
        else:
            dropped[reason_kind(why)] += 1
    return examples, dict(dropped)


def prompt_ids(tokenizer, template, problem):
    """The token ids of a problem's prompt: a record's own chat as it is (an official file's records
    already hold the official instruction), else one user turn of `template` around the question."""
    if problem.get("chat"):
        return chat_ids(tokenizer, problem["chat"])
    return chat_prompt_ids(tokenizer, template, problem["question"])


def step_problems(n_problems, per_step, seed, step):
    """Problem indices of RL step `step` (from 0): its slice of its epoch's (the same on resume)."""
    per_epoch = n_problems // per_step
    return epoch_batches(n_problems, per_step, seed, step // per_epoch)[step % per_epoch]


def epoch_batches(n, batch_size, seed, epoch):
    """The step batches of one epoch: a fixed permutation per (seed, epoch), leftovers dropped."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
