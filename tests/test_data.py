"""Tests for nanopr1/data.py: local files in every layout (TRL's SFT layouts too), short names
with a data dir, hub config / split / column names passed through, clear errors, the offline
hub message, and GSM8K's `#### n` on the real data."""

import json

import pytest

from conftest import SHARED, shared_file
from nanopr1 import UsageError, data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(*turns):
    """TRL's chat messages from (role, text) pairs."""
    return [{"role": role, "content": text} for role, text in turns]


@pytest.mark.parametrize("raw,question,answer", [
    ({"question": "Q?", "answer": "5"}, "Q?", "5"),
    ({"problem": "Q?", "answer": 5}, "Q?", "5"),                                   # MATH / AIME layout, int answer
    ({"Problem": "Q?", "Answer": 27.0}, "Q?", "27"),                               # float gold that is an integer
    ({"question": "Q?", "answer": "So 2+3=5.\n#### 1,005"}, "Q?", "1005"),         # hub GSM8K layout
    ({"prompt": [{"role": "user", "content": "Solve the following math problem step by step. The last line "
                  "of your response should be of the form Answer: $Answer\n\nQ?\n\nRemember to put your "
                  "answer on its own line after \"Answer:\"."}],
      "reward_model": {"ground_truth": "34", "style": "rule"}}, "Q?", "34"),        # hub DAPO layout
    ({"question": "Q?", "answer": ["-3"]}, "Q?", "-3"),
])
def test_record_layouts(raw, question, answer):
    [r] = data.to_records([raw], "test")
    assert (r["question"], r["answer"]) == (question, answer)


def test_gsm8k_layout_keeps_solution_and_extra_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "Q", "answer": "work\n#### 12", "response": "R", "id": 3}])
    [r] = data.load_problems(str(path))
    assert r == {"question": "Q", "answer": "12", "solution": "work\n#### 12", "response": "R", "id": 3}


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_local_file_formats(tmp_path, suffix):
    rows = [{"question": f"q{i}", "answer": str(i), "response": f"r{i}"} for i in range(3)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    assert data.load_problems(str(path)) == rows


def test_unicode_line_separator_inside_a_record(tmp_path):
    # U+2028 inside a JSON string is legal; str.splitlines() would cut the line there
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a\u2028b", "answer": "1"}])
    assert data.load_problems(str(path))[0]["question"] == "a\u2028b"


def test_short_names_read_the_data_dir(tmp_path):
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "t", "answer": "1"}])
    write_jsonl(tmp_path / "gsm8k_train.jsonl", [{"question": "tr", "answer": "2"}])
    write_jsonl(tmp_path / "eval_aime25.jsonl", [{"problem": "a", "answer": "70"}])
    assert data.load_problems("gsm8k", "test", tmp_path)[0]["question"] == "t"
    assert data.load_problems("gsm8k", data_dir=tmp_path)[0]["question"] == "tr"  # default split: train
    assert data.load_problems("aime25", data_dir=str(tmp_path)) == [{"problem": "a", "question": "a", "answer": "70"}]
    assert data.load_problems("aime25", "test", tmp_path) == data.load_problems("aime25", "train", tmp_path)  # one split only


@pytest.mark.parametrize("make,args,error,words", [
    (None, ("nope",), UsageError, ["unknown dataset 'nope'", "gsm8k", "toy-easy"]),
    (None, ("aime24", None, "DIR"), UsageError, ["'aime24'", "eval_aime24.jsonl"]),
    (None, ("DIR/missing.jsonl",), UsageError, ["missing.jsonl", "does not exist"]),
    ([{"answer": "1"}], ("DIR/d.jsonl",), UsageError, ["d.jsonl", "record 0 has no question"]),
    ([{"question": "q", "answer": "1"}, {"question": "q2"}], ("DIR/d.jsonl",), UsageError,
     ["d.jsonl", "record 1 has no answer"]),
    ([{"question": "q", "answer": ""}], ("DIR/d.jsonl",), UsageError, ["record 0 has no answer"]),
    ("{not json", ("DIR/d.jsonl",), UsageError, ["d.jsonl", "line 1 is not JSON"]),
])
def test_clear_errors(tmp_path, make, args, error, words):
    if isinstance(make, list):
        write_jsonl(tmp_path / "d.jsonl", make)
    elif isinstance(make, str):
        (tmp_path / "d.jsonl").write_text(make)
    args = tuple(str(a).replace("DIR", str(tmp_path)) if a is not None else None for a in args)
    with pytest.raises(error) as e:
        data.load_problems(*args)
    for w in words:
        assert w in str(e.value)


def test_offline_hub_says_how_to_use_a_local_file(monkeypatch):
    import datasets

    def unreachable(*a, **kw):
        raise ConnectionError("Couldn't reach 'math-ai/aime25' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UsageError) as e:
        data.load_problems("aime25")
    msg = str(e.value)
    for w in ["'aime25'", "math-ai/aime25", "Couldn't reach", "--data-dir", "eval_aime25.jsonl"]:
        assert w in msg


def test_hub_post_processing(monkeypatch):
    import datasets
    hub = {"BytedTsinghua-SIA/DAPO-Math-17k": [{"prompt": "p1", "answer": "1"}, {"prompt": "p1", "answer": "1"},
                                               {"prompt": "p2", "answer": "2"}],
           "HuggingFaceH4/MATH-500": [{"problem": "m1", "answer": "3"}, {"problem": "m2", "answer": "\\frac{1}{2}"},
                                      {"problem": "m3", "answer": "-4"}],
           "openai/gsm8k": [{"question": "g", "answer": "x\n#### 2,000"}]}
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, config, split: asked.append(split) or hub[hub_id])
    assert [r["question"] for r in data.load_problems("dapo", "test")] == ["p1", "p2"]  # one copy of each problem
    assert asked == ["train"]                                                   # dapo has only a train split
    assert [r["answer"] for r in data.load_problems("math300")] == ["3", "-4"]         # integer answers only
    assert data.load_problems("gsm8k")[0]["answer"] == "2000"


@pytest.mark.parametrize("source,kw,asked", [
    ("owner/set", {}, ("owner/set", None, "train")),                                 # a hub id's default
    ("owner/set", {"config": "cfg", "split": "validation"}, ("owner/set", "cfg", "validation")),
    ("owner/set", {"split": "test"}, ("owner/set", None, "test")),
    ("gsm8k", {}, ("openai/gsm8k", "main", "train")),                                # the table's row
    ("gsm8k", {"config": "socratic", "split": "test"}, ("openai/gsm8k", "socratic", "test")),
    ("aime25", {"config": "c", "split": "train"}, ("math-ai/aime25", "c", "test")),   # one split only
])
def test_hub_config_and_split_are_passed_through(monkeypatch, source, kw, asked):
    import datasets
    got = []
    hub = lambda hub_id, config, split: got.append((hub_id, config, split)) or [{"q": "Q", "a": "1"}]
    monkeypatch.setattr(datasets, "load_dataset", hub)
    [r] = data.load_problems(source, question_key="q", answer_key="a", **kw)
    assert got == [asked] and (r["question"], r["answer"]) == ("Q", "1")


@pytest.mark.parametrize("raw,keys,question,answer", [
    ({"text": "Q", "label": 3}, ("text", "label"), "Q", "3"),
    ({"question": "not this", "q2": "Q", "answer": "1"}, ("q2", None), "Q", "1"),   # only that column
    ({"question": "Q", "answer": "wrong", "gold": 2.0}, (None, "gold"), "Q", "2"),
    ({"msgs": [{"role": "user", "content": "Q"}], "rm": {"ground_truth": "4"}}, ("msgs", "rm"), "Q", "4"),
])
def test_question_and_answer_keys(tmp_path, raw, keys, question, answer):
    path = write_jsonl(tmp_path / "d.jsonl", [raw])
    [r] = data.load_problems(str(path), question_key=keys[0], answer_key=keys[1])
    assert (r["question"], r["answer"]) == (question, answer)


@pytest.mark.parametrize("raw,kw,message", [
    ({"text": "t", "label": 1}, {}, "d.jsonl: record 0 has no question column (looked for question, problem, "
     "prompt, Question, Problem, messages; found: text, label): pass --question-key"),
    ({"text": "t", "label": 1}, {"question_key": "txt"},
     "d.jsonl: record 0 has no question column (looked for txt; found: text, label): pass --question-key"),
    ({"question": "q", "label": 1}, {}, "d.jsonl: record 0 has no answer column (looked for answer, Answer, "
     "ground_truth, final_answer, reward_model; found: question, label): pass --answer-key"),
    ({"question": "q", "answer": "1"}, {"answer_key": "label"},
     "d.jsonl: record 0 has no answer column (looked for label; found: question, answer): pass --answer-key"),
    ({"question": "q", "answer": "1"}, {"response": True}, "d.jsonl: record 0 has no response column "
     "(looked for response, messages, completion; found: question, answer): pass --response-key"),
    ({"messages": chat(("assistant", "hi"), ("user", "Q"))}, {"response": True},  # no reply
     "d.jsonl: record 0 has no response column (looked for response, messages, completion; found: messages): "
     "pass --response-key"),
    (["q", "1"], {}, "d.jsonl: record 0 is a list, not a JSON object"),
])
def test_missing_column_is_one_line_naming_the_columns(tmp_path, raw, kw, message):
    path = write_jsonl(tmp_path / "d.jsonl", [raw])
    with pytest.raises(UsageError) as e:
        data.load_problems(str(path), **kw)
    assert str(e.value) == message.replace("d.jsonl", str(path))


@pytest.mark.parametrize("raw,question,answer,response,sent", [
    ({"question": "Q", "answer": "5", "response": "R"}, "Q", "5", "R", None),          # our layout
    ({"question": "Q", "response": "R"}, "Q", None, "R", None),                         # no gold answer: fine
    ({"messages": chat(("system", "S"), ("user", "Q1"), ("assistant", "R1"), ("user", "Q"),
                       ("assistant", "R"))}, "Q", None, "R", 4),                         # TRL conversational
    ({"prompt": "Q", "completion": "R", "answer": "5"}, "Q", "5", "R", None),  # TRL prompt-completion
    ({"prompt": chat(("system", "S"), ("user", "Q")), "completion": chat(("assistant", "R"))},
     "Q", None, "R", 2),                                                                # ...conversational
])
def test_sft_layouts(tmp_path, bpe_tokenizer, raw, question, answer, response, sent):
    """A bare question gets our template; a record's own chat (up to its last user turn) goes as it is."""
    from nanopr1.format import PARALLEL_PROMPT, chat_ids, chat_prompt_ids
    [r] = data.load_problems(str(write_jsonl(tmp_path / "d.jsonl", [raw])), response=True)
    assert (r["question"], r.get("answer"), r["response"]) == (question, answer, response)
    [(prompt, _)], _ = data.sft_examples([r], bpe_tokenizer, PARALLEL_PROMPT, 4096)  # what train_sft reads
    chat_ = raw.get("messages") or raw.get("prompt")
    expected = (chat_prompt_ids(bpe_tokenizer, PARALLEL_PROMPT, question) if sent is None
                else chat_ids(bpe_tokenizer, chat_[:sent]))
    assert prompt == expected


def test_an_official_record_reaches_the_model_unwrapped(bpe_tokenizer):
    """verl's records (`prompt` = the chat with the official instruction) are sent as they are: one
    instruction, not ours around theirs."""
    from nanopr1.format import PARALLEL_PROMPT, chat_ids
    rows = data.read_file(shared_file("official_apo_test_v3.parquet"))[:3]
    for raw, r in zip(rows, data.to_records(rows, "official")):
        ids = data.prompt_ids(bpe_tokenizer, PARALLEL_PROMPT, r)
        assert ids == chat_ids(bpe_tokenizer, list(raw["prompt"]))
        text = bpe_tokenizer.decode(ids)
        assert text.count("Problem:") == 1 and PARALLEL_PROMPT.split("\n")[0] not in text
        assert r["answer"] == raw["reward_model"]["ground_truth"]


def test_rl_records_still_need_an_answer():
    with pytest.raises(UsageError, match="record 0 has no answer column"):
        data.to_records([{"prompt": "Q", "completion": "R"}], "test")


@pytest.mark.parametrize("level", ["easy", "hard"])
def test_toy_sets(level):
    from nanopr1 import toy
    records = data.load_problems(f"toy-{level}")
    assert records == toy.eval_set(level) and len(records) > 0
    assert all(set(r) >= {"question", "answer"} for r in records)

# -----------------------------------------------------------------------------
# the real data in ../shared/data


@pytest.mark.parametrize("split,size", [("train", 7473), ("test", 1319)])
def test_gsm8k_solutions_parse_to_their_answer(split, size):
    shared_file(f"gsm8k_{split}.jsonl")
    records = data.load_problems("gsm8k", split, SHARED)
    assert len(records) == size
    bad = [r for r in records if data.gsm8k_answer(r["solution"]) != r["answer"]]
    assert bad == []


@pytest.mark.parametrize("name,size", [("aime24", 30), ("aime25", 30), ("amc23", 40), ("math300", 316),
                                       ("dapo", 17917)])
def test_shared_sets_load(name, size):
    shared_file(data.HUB[name][3])  # its file name in a --data-dir
    records = data.load_problems(name, data_dir=SHARED)
    assert len(records) == size
    assert all(r["question"].strip() and r["answer"].strip() for r in records)


def test_teacher_traces_keep_their_response():
    path = shared_file("parallel_gsm8k_sample.jsonl")
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    records = data.load_problems(str(path))
    assert len(records) == 341
    assert [r["response"] for r in records] == [r["response"] for r in raw]


def test_non_utf8_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "traces.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "1", "response": "caf\xe9"}\n')
    with pytest.raises(UsageError, match=r"not UTF-8 text \(bad byte at offset 49\): re-save it as UTF-8"):
        data.load_problems(str(bad))


def test_a_damaged_parquet_or_json_list_is_one_line(tmp_path):
    parquet, listing = tmp_path / "set.parquet", tmp_path / "set.json"
    parquet.write_bytes(b"PAR1 not really")
    listing.write_text('[{"question": "q", "answer": "1"},')
    with pytest.raises(UsageError, match=r"set.parquet' could not be read as parquet \("):
        data.load_problems(str(parquet))
    with pytest.raises(UsageError, match=r"set.json: not a JSON list \(Expecting value at line 1\)"):
        data.load_problems(str(listing))


def test_step_problems_are_distinct_and_fixed():
    """Steps of 4 over 10 problems: two steps an epoch, each a slice of the epoch's fixed order (the 2 left
    over wait for a later epoch); a new order each epoch; step k does not depend on the steps before it."""
    steps = [data.step_problems(10, 4, seed=3, step=s) for s in range(6)]
    assert all(len(set(x)) == 4 for x in steps)
    for e in range(3):
        assert steps[2 * e] + steps[2 * e + 1] == sum(data.epoch_batches(10, 4, seed=3, epoch=e), [])
    assert steps[0] != steps[2]
    batches = data.epoch_batches(10, 4, seed=3, epoch=1)
    assert [len(b) for b in batches] == [4, 4] and len(set(sum(batches, []))) == 8  # the last partial batch dropped


@pytest.mark.parametrize("problems, per_step, steps, group", [(7473, 1024, 35, 5),   # easy RL: GSM8K train
                                                              (17917, 512, 300, 8),  # hard RL: DAPO-Math-17k
                                                              (20000, 16, 40, 8)])   # the toy
def test_a_recipes_steps_have_distinct_problems_and_random_streams(problems, per_step, steps, group):
    """The recipes' real sizes: no problem twice in a step (the old epoch-crossing steps of GSM8K repeated 35,
    30, 12 and 17 problems at steps 8, 15, 22 and 30), and every rollout of the run has its own random stream
    (train_rl seeds problem i of step s with mix(seed, s, i), the sampler its g-th rollout with mix(that, g))."""
    from nanopr1.sampler import mix
    keys = set()
    for s in range(1, steps + 1):
        idx = data.step_problems(problems, per_step, 0, s - 1)
        assert len(set(idx)) == per_step
        keys.update(mix(mix(0, s, i), g) for i in idx for g in range(group))
    assert len(keys) == steps * per_step * group