"""
Datasets as plain lists of {question, answer} records.

One loader, `load(source, split=None, data_dir=None, ...)`, reads
- a short name of HUB below: from the hub, or offline with `data_dir` (the
  scripts' `--data-dir DIR`) from the file named in its row;
- toy-easy / toy-hard: the held-out problems of the toy world (nanopr1.toy);
- a local .jsonl / .json / .parquet file;
- any other hub id ("owner/name").
Every record comes back with `question` and `answer` as strings; other fields
(a GSM8K `solution`, a teacher trace's `response`) are kept. The columns are found by
name (QUESTION_KEYS, ANSWER_KEYS) or named (`--question-key`, `--answer-key`); an SFT
corpus may also be in TRL's layouts (`messages`, or `prompt` / `completion`).

The hub ids are our choice where the paper names none. Three sets need care:
- gsm8k: its `answer` field is a worked solution ending in `#### n`; we keep
  it as `solution` and the number n as `answer`.
- dapo: the hub copy repeats each problem many times and wraps it in DAPO's
  own instruction; we strip the wrapper (our prompt is added later) and keep
  one copy of each problem.
- math300: the paper evaluates on a ~300-problem integer-answer subset of
  MATH; we take the integer-answer problems of MATH-500 (the shared offline
  copy has 316 problems).

For the cold-start corpus, `judge_trace` decides whether a teacher's trace is kept;
`sft_examples` turns the kept traces into token ids.
"""

import json
import os
import re
from pathlib import Path

import torch

from nanopr1 import UsageError
from nanopr1.format import chat_prompt_ids, check_format, normalize, parse
from nanopr1.rewards import grade

# short name -> (hub id, config, split, file name in a data dir); `split` only chooses between
# gsm8k's train and test (and fills in its file name)
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "train", "gsm8k_{split}.jsonl"),
    "dapo": ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train", "dapo_math_17k.jsonl"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "eval_aime24.jsonl"),
    "aime25": ("math-ai/aime25", None, "test", "eval_aime25.jsonl"),
    "amc23": ("math-ai/amc23", None, "test", "eval_amc23.jsonl"),
    "math300": ("HuggingFaceH4/MATH-500", None, "test", "eval_math300.jsonl"),
}
LOCAL_FILES = {name: row[3] for name, row in HUB.items()}
TOY = ("toy-easy", "toy-hard")
QUESTION_KEYS = ("question", "problem", "prompt", "Question", "Problem", "messages")
ANSWER_KEYS = ("answer", "Answer", "ground_truth", "final_answer", "reward_model")


def gsm8k_answer(solution):
    """The gold number of a GSM8K solution: the text after `####`, thousands separators dropped."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution without '#### n': {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


_DAPO_RE = re.compile(r"^Solve the following math problem.*?\n\n(.*)\n\nRemember to put your answer.*$", re.DOTALL)


def _content(messages, role, last=True):
    """The text of the last (or first) `role` turn of a list of chat messages."""
    turns = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == role]
    return (turns[-1] if last else turns[0]) if turns else None


def _question(raw, keys=QUESTION_KEYS):
    for key in keys:
        q = raw.get(key)
        if isinstance(q, list):  # chat messages (DAPO's `prompt`, TRL's `messages`): the last user turn
            q = _content(q, "user")
        if isinstance(q, str) and q.strip():
            m = _DAPO_RE.match(q)
            return m.group(1).strip() if m else q
    return None


def _answer(raw, keys=ANSWER_KEYS):
    a = next((raw[k] for k in keys if raw.get(k) not in (None, "")), None)
    if isinstance(a, dict):  # verl's layout: reward_model = {"ground_truth": ..., "style": ...}
        a = a.get("ground_truth")
    if isinstance(a, list) and len(a) == 1:
        a = a[0]
    if isinstance(a, float) and a.is_integer():
        a = int(a)  # 27.0 -> "27"
    return None if a is None or str(a).strip() == "" else str(a).strip()


def _response(raw):
    """A teacher's response in our layout (`response`) or TRL's: the assistant turn after the last user
    turn of `messages`, or `completion` (a string or a list of messages)."""
    r, msgs, comp = raw.get("response"), raw.get("messages"), raw.get("completion")
    if r is None and isinstance(msgs, list):
        last_user = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"),
                        default=-1)
        r = _content(msgs[last_user + 1:], "assistant", last=False)
    if r is None and comp is not None:
        r = _content(comp, "assistant", last=False) if isinstance(comp, list) else comp
    return r if isinstance(r, str) else None


def to_records(rows, source, fields=(), question_key=None, answer_key=None):
    """Raw dicts -> {question, answer, ...} records; one clear error naming the source, row and columns.
    fields: text fields every record must also have. An SFT corpus ("response") may come in TRL's
    layouts and may lack the gold answer (None then: SFT does not need it).
    question_key / answer_key: the one column to read (default: the first of QUESTION_KEYS /
    ANSWER_KEYS that holds a value)."""
    keys = {"question": (question_key,) if question_key else QUESTION_KEYS,
            "answer": (answer_key,) if answer_key else ANSWER_KEYS,
            "response": ("response", "messages", "completion")}
    out = []
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise UsageError(f"{source}: record {i} is a {type(raw).__name__}, not a JSON object")
        record = dict(raw, question=_question(raw, keys["question"]), answer=_answer(raw, keys["answer"]))
        record.update({f: _response(raw) if f == "response" else raw.get(f) for f in fields})
        for what in ("question", "answer", *fields):
            if not isinstance(record[what], str) and not (what == "answer" and "response" in fields):
                looked, found = ", ".join(keys.get(what, (what,))), ", ".join(map(str, raw)) or "nothing"
                flag = f": pass --{what}-key" if what in ("question", "answer") else ""
                raise UsageError(f"{source}: record {i} has no {what} column "
                                 f"(looked for {looked}; found: {found}){flag}")
        if record["answer"] and "####" in record["answer"]:  # GSM8K layout: the answer is the whole solution
            record["solution"], record["answer"] = record["answer"], gsm8k_answer(record["answer"])
        out.append(record)
    return out


def read_file(path):
    """Raw dicts from a .jsonl / .json / .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {str(path)!r} does not exist")
    if path.suffix not in (".jsonl", ".json", ".parquet", ".txt", ""):
        raise UsageError(f"data file {str(path)!r}: a {path.suffix} file; use JSONL (one JSON object a line), "
                         f"a JSON list or parquet")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start}): "
                         f"re-save it as UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): it also splits at U+2028 inside strings
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: line {n} is not JSON ({e.msg})") from None
    return rows


def offline_if_unreachable():
    """If the hub's host cannot be reached (no network), put the hub libraries in offline mode: a cached
    copy still loads, a missing one fails at once instead of after a minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


def read_hub(name, hub_id, config, split):
    """Raw dicts of a hub dataset; a clear message when the hub cannot be reached."""
    import datasets
    offline_if_unreachable()
    try:  # an iterable of dicts, not a list: the DAPO copy has ~1.8M rows
        return datasets.load_dataset(hub_id, config, split=split)  # config is load_dataset's `name`
    except Exception as e:  # offline, missing, gated, renamed: all end the same way for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        local = LOCAL_FILES.get(name, "FILE.jsonl").format(split=split)
        what = f"config {config}, split {split}" if config else f"split {split}"
        raise UsageError(f"dataset {name!r}: could not load {hub_id} ({what}) from the hub ({first}). "
                           f"Offline? Put the records in a local JSONL/parquet file and pass --data-dir DIR "
                           f"(expects DIR/{local}) or the file path instead of the name") from None


def load(source, split=None, data_dir=None, fields=(), config=None, question_key=None, answer_key=None):
    """A list of {question, answer, ...} records from a short name, a file or a hub id.

    split: for gsm8k "train" (default) or "test"; the other named sets have one
    split and ignore it; a hub id uses it as given (default "train").
    config: the hub config (load_dataset's `name`); for a short name it replaces the table's.
    question_key / answer_key / fields: see to_records.
    """
    source = str(source)
    records = lambda rows, where: to_records(rows, where, fields, question_key, answer_key)
    if source in TOY:
        from nanopr1 import toy  # lazily: the toy world is not needed for real data
        return records(toy.eval_set(source.split("-", 1)[1]), source)
    if source in HUB:
        hub_id, default_config, default_split, local = HUB[source]
        split = (split or default_split) if source == "gsm8k" else default_split
        if data_dir is not None:
            path = Path(data_dir) / local.format(split=split)
            if not path.is_file():
                raise UsageError(f"dataset {source!r}: {path} does not exist "
                                 f"(with --data-dir, {source} is read from {local.format(split=split)})")
            return records(read_file(path), f"{source} ({path})")
        rows = read_hub(source, hub_id, config or default_config, split)
        if source == "dapo":  # the hub copy repeats each problem ~100 times: keep the first copy
            first = {}
            for raw in rows:  # streamed: the full list would not fit comfortably
                first.setdefault(_question(raw, (question_key,) if question_key else QUESTION_KEYS), raw)
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


def write_rows(path, rows, mode="w"):
    """Append rows (mode "a"), or replace the file: written aside and renamed, so a kill leaves the old one."""
    tmp = Path(f"{path}.tmp") if mode == "w" else Path(path)
    with open(tmp, mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp.replace(path)


def read_rows(path):
    """Rows of a JSONL file a run appends to (none if it is absent); a torn line (the run was killed
    mid-write) is skipped, so the row it held is simply decided again."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def judge_trace(text, gold):
    """A teacher's trace for the SFT corpus: (response, None) to keep it, or (None, reason).

    The teacher's thinking (everything up to its last </think>) is dropped and the rest normalised;
    the trace is kept if it is well formed, has at least one block and its final answer is right
    (the paper's filter). The reason is cut at ':' so that rejections count by kind."""
    response = normalize(text.split("</think>")[-1].strip())
    why = check_format(response)
    if why is None and not parse(response).blocks:
        why = "no parallel block"
    if why is None and not grade(response, gold):
        why = "wrong final answer"
    return (response, None) if why is None else (None, why.split(":")[0])


def training_problems(source, seed=0, data_dir=None, split="train", **options):
    """Problems to train on: a name, file or hub id (its train split unless `split` says otherwise;
    `options`: load's config / question_key / answer_key), or toy:easy / toy:hard, the toy world's
    training problems (toy-easy / toy-hard are its held-out evaluation sets: refused)."""
    if source in TOY:
        raise UsageError(f"--data {source} is the toy's held-out evaluation set; train on toy:{source[4:]}")
    if source.startswith("toy:"):
        from nanopr1 import toy
        return to_records(toy.problems(source[4:], 20000, seed=seed), source)
    return load(source, split=split, data_dir=data_dir, **options)


def sft_examples(rows, tokenizer, template, max_len):
    """Tokenise rows into (prompt, response + EOS) id lists. Malformed or too-long traces
    are dropped and counted by reason; the prompt is tokenised apart and never parsed."""
    examples, dropped = [], {}
    for row in rows:
        response = normalize(row["response"])
        why = check_format(response)
        if why is None:
            prompt = chat_prompt_ids(tokenizer, template, row["question"])
            resp = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            why = f"longer than --max-len {max_len}" if len(prompt) + len(resp) > max_len else None
        if why is not None:
            key = why.split(":")[0]
            dropped[key] = dropped.get(key, 0) + 1
            continue
        examples.append((prompt, resp))
    return examples, dropped


def step_problems(n_problems, per_step, seed, step):
    """Problem indices of RL step `step` (from 0): the step's slice of its epoch's fixed random order
    (epoch_batches; the problems left over at an epoch's end wait for a later order), so a step's
    problems are distinct, and a resumed run sees the same prompts."""
    per_epoch = n_problems // per_step
    return epoch_batches(n_problems, per_step, seed, step // per_epoch)[step % per_epoch]


def epoch_batches(n, batch_size, seed, epoch):
    """The step batches of one epoch: a fixed permutation per (seed, epoch), so resuming
    at any step sees the same data order as the uninterrupted run."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
