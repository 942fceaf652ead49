"""Tests for nanopr1/data.py: local files in every layout, short names with a data dir,
clear errors, the offline hub message, and GSM8K's `#### n` on the real data."""

import json

import pytest

from conftest import SHARED, shared_file
from nanopr1 import UsageError, data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


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
    [r] = data.load(str(path))
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
    assert data.load(str(path)) == rows


def test_unicode_line_separator_inside_a_record(tmp_path):
    # U+2028 inside a JSON string is legal; str.splitlines() would cut the line there
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a\u2028b", "answer": "1"}])
    assert data.load(str(path))[0]["question"] == "a\u2028b"


def test_short_names_read_the_data_dir(tmp_path):
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "t", "answer": "1"}])
    write_jsonl(tmp_path / "gsm8k_train.jsonl", [{"question": "tr", "answer": "2"}])
    write_jsonl(tmp_path / "eval_aime25.jsonl", [{"problem": "a", "answer": "70"}])
    assert data.load("gsm8k", "test", tmp_path)[0]["question"] == "t"
    assert data.load("gsm8k", data_dir=tmp_path)[0]["question"] == "tr"  # default split: train
    assert data.load("aime25", data_dir=str(tmp_path)) == [{"problem": "a", "question": "a", "answer": "70"}]
    assert data.load("aime25", "test", tmp_path) == data.load("aime25", "train", tmp_path)  # one split only


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
        data.load(*args)
    for w in words:
        assert w in str(e.value)


def test_offline_hub_says_how_to_use_a_local_file(monkeypatch):
    import datasets

    def unreachable(*a, **kw):
        raise ConnectionError("Couldn't reach 'math-ai/aime25' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UsageError) as e:
        data.load("aime25")
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
    assert [r["question"] for r in data.load("dapo", "test")] == ["p1", "p2"]  # one copy of each problem
    assert asked == ["train"]                                                   # dapo has only a train split
    assert [r["answer"] for r in data.load("math300")] == ["3", "-4"]         # integer answers only
    assert data.load("gsm8k")[0]["answer"] == "2000"


@pytest.mark.parametrize("level", ["easy", "hard"])
def test_toy_sets(level):
    from nanopr1 import toy
    records = data.load(f"toy-{level}")
    assert records == toy.eval_set(level) and len(records) > 0
    assert all(set(r) >= {"question", "answer"} for r in records)

# -----------------------------------------------------------------------------
# the real data in ../shared/data


@pytest.mark.parametrize("split,size", [("train", 7473), ("test", 1319)])
def test_gsm8k_solutions_parse_to_their_answer(split, size):
    shared_file(f"gsm8k_{split}.jsonl")
    records = data.load("gsm8k", split, SHARED)
    assert len(records) == size
    bad = [r for r in records if data.gsm8k_answer(r["solution"]) != r["answer"]]
    assert bad == []


@pytest.mark.parametrize("name,size", [("aime24", 30), ("aime25", 30), ("amc23", 40), ("math300", 316),
                                       ("dapo", 17917)])
def test_shared_sets_load(name, size):
    shared_file(data.LOCAL_FILES[name])
    records = data.load(name, data_dir=SHARED)
    assert len(records) == size
    assert all(r["question"].strip() and r["answer"].strip() for r in records)


def test_teacher_traces_keep_their_response():
    path = shared_file("parallel_gsm8k_sample.jsonl")
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    records = data.load(str(path))
    assert len(records) == 341
    assert [r["response"] for r in records] == [r["response"] for r in raw]


def test_non_utf8_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "traces.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "1", "response": "caf\xe9"}\n')
    with pytest.raises(UsageError, match=r"not UTF-8 text \(bad byte at offset 49\): re-save it as UTF-8"):
        data.load(str(bad))


def test_step_problems_cross_epochs_without_repeats_or_skips():
    """Steps of 4 over 10 problems: the steps read the epochs' orders one after another; each epoch's
    order is a permutation; step k does not depend on the steps before it (resume)."""
    seq = sum((data.step_problems(10, 4, seed=3, step=s) for s in range(5)), [])  # 20 = two whole epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    assert seq[:10] != seq[10:]  # a new order each epoch
    assert data.step_problems(10, 4, seed=3, step=2) == seq[8:12]  # across the epoch boundary
    assert data.step_problems(10, 25, seed=3, step=0)[:20] == seq  # bigger than an epoch: reads on
    batches = data.epoch_batches(10, 4, seed=3, epoch=1)
    assert [len(b) for b in batches] == [4, 4] and len(set(sum(batches, []))) == 8  # the last partial batch dropped
