"""Tests for nanopr1/evaluation.py and eval.py: the unbiased Pass@k against brute force, the summary and
table, grading and resuming with a stand-in sampler, the run key, official files (a row per data_source,
n from the copies), two graders side by side, argument checks, and real runs on tiny models, in one process
and in two (torchrun; no rank may reach the interpreter's teardown)."""

import itertools
import json
import os
import random
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import nanopr1.model
import nanopr1.sampler
from conftest import init_toy_dir, run, shared_file, tiny_model
import nanopr1.data
from nanopr1 import UsageError, toy
from nanopr1 import evaluation as ev
from nanopr1.format import PARALLEL_PROMPT, SEQUENTIAL_PROMPT

ROOT = Path(__file__).resolve().parents[1]
EVAL = runpy.run_path(str(ROOT / "eval.py"))
main = EVAL["main"]  # the script's main(argv), run in this process as a user runs it

ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")

# -----------------------------------------------------------------------------
# metrics


def brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (c correct) that hold at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force():
    rng = random.Random(0)
    cases = [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)]
    cases += [(n, rng.randint(0, n), rng.randint(1, n)) for n in rng.choices(range(9, 13), k=20)]
    for n, c, k in cases:
        assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_mean_and_planted_bug_is_caught():
    assert ev.pass_at_k(16, 3, 1) == pytest.approx(3 / 16)
    biased = lambda n, c, k: 1 - (1 - c / n) ** k  # the with-replacement estimator: not unbiased  # noqa: E731
    assert biased(4, 1, 2) != pytest.approx(brute_pass_at_k(4, 1, 2))


@pytest.mark.parametrize("n,ks", [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]), (5, [1, 2, 4, 5]), (12, [1, 2, 4, 8, 12]),
                                  (16, [1, 2, 4, 8, 16])])
def test_ks_for(n, ks):
    assert ev.ks_for(n) == ks


def row(problem, sample, correct, has_block=False, format_ok=True, length=10):
    return {"problem": problem, "sample": sample, "correct": correct, "has_block": has_block,
            "format_ok": format_ok, "length": length}


def test_summarize():
    rows = [row(0, 0, True, True, length=10), row(0, 1, False, length=20),
            row(1, 0, False, format_ok=False, length=30), row(1, 1, False, True, length=40)]
    s = ev.summarize(rows, 2)
    assert s == {"problems": 2, "rollouts": 4, "n": 2, "mean@2": 0.25, "pass@1": 0.25, "pass@2": 0.5,
                 "parallel": 0.5, "format_ok": 0.75, "length": 25.0}
    table = ev.format_table({"aime25": s})
    assert table.splitlines()[0].split() == ["dataset", "problems", "mean@2", "pass@1", "pass@2", "parallel%",
                                             "format%", "length", "blocks", "latency"]
    assert table.splitlines()[1].split() == ["aime25", "2", "25.0", "25.0", "50.0", "50.0", "75.0", "25", "-", "-"]


def test_behaviour_metrics_of_the_table_equal_metrics_summarize(bpe_tokenizer):
    """Each row keeps its rollout's behaviour sums; a dataset's summary reduces them exactly as
    nanopr1.metrics does for the rollouts themselves (blocks, first block, latency ratio, ...)."""
    from nanopr1 import metrics
    from nanopr1.format import tag_ids
    from nanopr1.rollout import make_rollout
    t = tag_ids(bpe_tokenizer)
    block = [t["<Parallel>"], t["<Path>"], 40, 41, t["</Path>"], t["<Path>"], 42, t["</Path>"], t["</Parallel>"],
             t["<Summary>"], 43, t["</Summary>"]]
    ros = [make_rollout(bpe_tokenizer, [5, 6], [30, 31] + block + [32, bpe_tokenizer.eos_token_id]),
           make_rollout(bpe_tokenizer, [5, 6], [33] * 7 + [bpe_tokenizer.eos_token_id]),
           make_rollout(bpe_tokenizer, [5, 6], block + block + [34, bpe_tokenizer.eos_token_id])]
    rows = [ev.grade_rollout({"question": "q", "answer": "1"}, i, 0, r) for i, r in enumerate(ros)]
    s = ev.summarize(rows, 1)
    expected = metrics.means(ros)
    assert {k: s[k] for k in expected} == pytest.approx(expected)
    assert s["blocks_per_rollout"] == 1.0 and s["latency_ratio"] > 1
    line = ev.format_table({"x": s}).splitlines()[1].split()
    assert line[-2:] == ["1.00", f"{s['latency_ratio']:.2f}"]


def test_table_of_datasets_with_different_n():
    """MATH300 at Mean@1 beside AIME at Mean@4: every mean@n / pass@k column, "-" where a dataset has none."""
    aime = ev.summarize([row(0, j, j == 0) for j in range(4)], 4)
    math = ev.summarize([row(0, 0, True), row(1, 0, False)], 1)
    lines = [line.split() for line in ev.format_table({"aime25": aime, "math300": math}).splitlines()]
    assert lines[0] == ["dataset", "problems", "mean@4", "mean@1", "pass@1", "pass@2", "pass@4", "parallel%",
                        "format%", "length", "blocks", "latency"]
    assert lines[1] == ["aime25", "1", "25.0", "-", "25.0", "50.0", "100.0", "0.0", "100.0", "10", "-", "-"]
    assert lines[2] == ["math300", "2", "-", "50.0", "50.0", "-", "-", "0.0", "100.0", "10", "-", "-"]


@pytest.mark.parametrize("num_problems,batch_size,world,shares", [
    (5, 2, 1, [[[0, 1], [2, 3], [4]]]),
    (5, 2, 2, [[[0, 1], [4]], [[2, 3]]]),
    (5, 1, 3, [[[0], [3]], [[1], [4]], [[2]]]),
    (2, 4, 3, [[[0, 1]], [], []]),  # more ranks than batches: the others have nothing to do
])
def test_shard_batches_do_not_depend_on_the_world_size(num_problems, batch_size, world, shares):
    assert [ev.shard(num_problems, batch_size, r, world) for r in range(world)] == shares

# -----------------------------------------------------------------------------
# grading and resuming, with a stand-in sampler


PROBLEMS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
BLOCK = "<Parallel><Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary>"


def fake_text(question, j):
    """Sample j of a question: right on even j, a block on j == 1, the right answer only in a path on j == 3."""
    i = int(question.split()[2])
    if j == 3:
        return f"<Parallel><Path>Final Answer: {2 * i}</Path><Path>b</Path></Parallel><Summary>s</Summary>" \
               f"Final Answer: {2 * i + 1}"
    return (BLOCK if j == 1 else "") + f"so\nFinal Answer: {2 * i if j % 2 == 0 else -1}"


class Calls(list):
    """The questions sampled, in order; `prompts`: the prompt ids sent."""
    prompts = None


@pytest.fixture
def fake_sampler(monkeypatch, bpe_tokenizer):
    """Replace sampler.sample; record which questions were sampled. Its rollouts are built by make_rollout,
    the tags of fake_text tokenized as tag tokens (rewards judge the structure from tokens)."""
    calls = Calls()
    calls.prompts = []

    def sample(model, tokenizer, prompts, group_size=1, **kw):
        out = []
        for p in prompts:
            question = next(q["question"] for q in PROBLEMS if q["question"] in tokenizer.decode(p))
            calls.append(question)
            calls.prompts.append(list(p))
            for j in range(group_size):
                ids = tokenizer(fake_text(question, j), add_special_tokens=False)["input_ids"]
                out.append(nanopr1.rollout.make_rollout(tokenizer, p, ids + [tokenizer.eos_token_id], "eos"))
        return out
    monkeypatch.setattr(nanopr1.sampler, "sample", sample)
    monkeypatch.setattr(nanopr1.model, "load_model", lambda *a, **kw: (tiny_model(bpe_tokenizer), bpe_tokenizer))
    return calls


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def test_evaluate_grades_like_rl(fake_sampler, bpe_tokenizer):
    rows, s = ev.evaluate(tiny_model(bpe_tokenizer), bpe_tokenizer, PROBLEMS, n=4, batch_size=2, progress=False)
    assert len(rows) == 20 and [(r["problem"], r["sample"]) for r in rows[:4]] == [(0, j) for j in range(4)]
    assert [r["correct"] for r in rows[:4]] == [True, False, True, False]  # j=3: right only inside a path
    assert s["mean@4"] == 0.5 and s["pass@4"] == 1.0
    tokens = lambda text: len(bpe_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + 1: the EOS
    lengths = [tokens(fake_text(q["question"], j)) for q in PROBLEMS for j in range(4)]
    assert s["parallel"] == 0.5 and s["format_ok"] == 1.0 and s["length"] == sum(lengths) / 20


def test_evaluate_shares_merge_to_the_whole(fake_sampler, bpe_tokenizer):
    """Each rank samples only its share; merged, the shares are the single-process rows."""
    model = tiny_model(bpe_tokenizer)
    whole, s = ev.evaluate(model, bpe_tokenizer, PROBLEMS, n=2, batch_size=2, progress=False)
    fake_sampler.clear()
    shares = [ev.evaluate(model, bpe_tokenizer, PROBLEMS, n=2, batch_size=2, progress=False, rank=r, world=2)[0]
              for r in range(2)]
    assert fake_sampler == [PROBLEMS[i]["question"] for i in (0, 1, 4, 2, 3)]  # each problem once
    assert sorted({r["problem"] for r in shares[1]}) == [2, 3]
    assert ev.merge(shares) == whole and ev.summarize(ev.merge(shares), 2) == s


def run_main(args, capsys):
    summaries = main(args)
    captured = capsys.readouterr()
    return summaries, captured.out + captured.err


def model_dir(out):
    """The one model sub-directory of an --out."""
    (sub,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return sub


def kill_torn_merged(d, lines):
    """Killed while the merged file was written: problems 0-2 complete, problem 3 half, a torn last line."""
    (d / "set.jsonl").write_text("".join(lines[:14]) + lines[14][:30])


def kill_rank_files(d, lines):
    """A 2-process run killed mid-way: problem 0 merged earlier, problems 1-2 and half of 3 in rank files
    (one of them ending in a torn line)."""
    (d / "set.jsonl").write_text("".join(lines[:4]))
    (d / "set.rank0.jsonl").write_text("".join(lines[8:14]) + lines[14][:30])
    (d / "set.rank1.jsonl").write_text("".join(lines[4:8]) + lines[16][:10])


def kill_before_any_merge(d, lines):
    """A 2-process run killed before its first merge: only rank files, torn, with no merged file at all."""
    (d / "set.jsonl").unlink()
    (d / "set.rank0.jsonl").write_text("".join(lines[:4] + lines[8:12]) + lines[14][:30])
    (d / "set.rank1.jsonl").write_text("".join(lines[4:8] + lines[12:14]) + lines[16][:10])


@pytest.mark.parametrize("kill", [kill_torn_merged, kill_rank_files, kill_before_any_merge])
def test_resume_after_a_kill(fake_sampler, problems_file, tmp_path, capsys, kill):
    out = tmp_path / "out"
    args = ["--model", "m", "--datasets", str(problems_file), "--n", "4", "--batch-size", "2", "--out", str(out),
            "--no-progress"]
    first, printed = run_main(args, capsys)
    assert "set" in printed and "mean@4" in printed and "50.0" in printed
    d = model_dir(out)
    jsonl = d / "set.jsonl"
    full = jsonl.read_text()
    assert len(full.splitlines()) == 20 and len(fake_sampler) == 5
    kill(d, full.splitlines(keepends=True))
    fake_sampler.clear()
    second, printed = run_main(args, capsys)
    assert fake_sampler == [PROBLEMS[3]["question"], PROBLEMS[4]["question"]]  # only the unfinished problems
    assert second == first and "recomputing" not in printed
    assert jsonl.read_text() == full and not list(d.glob("set.rank*"))
    assert json.loads((d / "summary.json").read_text())["datasets"]["set"] == first["set"]
    # a third run has nothing left to sample
    fake_sampler.clear()
    assert run_main(args, capsys)[0] == first and fake_sampler == []


@pytest.mark.parametrize("change,field", [
    (["--temperature", "0.6"], "temperature"), (["--seed", "1"], "seed"), (["--limit", "4"], "limit, problems"),
    (["--max-new-tokens", "100"], "max_new_tokens"), (["--n", "3"], "n"), (["--variant", "unseen"], "variant"),
    (["--dtype", "bfloat16"], "dtype"), ("new questions", "problems"), (["--lenient-grader", "none"], "lenient_grader"),
    (["--grader", "is_equiv"], "grader, lenient_grader")])
def test_other_settings_or_problems_are_recomputed(fake_sampler, problems_file, tmp_path, capsys, change, field):
    out = tmp_path / "out"
    args = ["--model", "m", "--datasets", str(problems_file), "--n", "2", "--out", str(out), "--no-progress"]
    run_main(args, capsys)
    fake_sampler.clear()
    run_main(args, capsys)
    assert fake_sampler == []  # the same key: nothing to sample
    if change == "new questions":
        problems_file.write_text("".join(json.dumps(dict(p, question=p["question"] + "!")) + "\n" for p in PROBLEMS))
        change = []
    *_, printed = run_main(args + change, capsys)
    assert len(fake_sampler) == (4 if field.startswith("limit") else 5)  # every problem sampled again
    line = next(line for line in printed.splitlines() if "recomputing" in line)
    assert f"set was evaluated with other settings ({field})" in line
    rows = nanopr1.data.read_rows(model_dir(out) / "set.jsonl")
    assert len(rows) == len(fake_sampler) * (3 if field == "n" else 2)


def write_sets(data_dir):
    """Tiny local copies of aime25 and math300, named as data.HUB expects them."""
    data_dir.mkdir()
    for name in ("eval_aime25.jsonl", "eval_math300.jsonl"):
        (data_dir / name).write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:2]))
    return data_dir


@pytest.mark.parametrize("extra,ns", [([], {"aime25": 16, "math300": 1}), (["--n", "2"], {"aime25": 2, "math300": 2})])
def test_n_per_dataset(fake_sampler, tmp_path, capsys, extra, ns):
    """The paper's n: Mean@16 on AIME, Mean@1 on MATH300; an explicit --n applies to every dataset."""
    out = tmp_path / "out"
    summaries, printed = run_main(["--model", "m", "--datasets", "aime25,math300", "--out", str(out),
                                   "--data-dir", str(write_sets(tmp_path / "data")), "--no-progress"] + extra, capsys)
    assert {name: s["n"] for name, s in summaries.items()} == ns
    assert all(s["rollouts"] == 2 * ns[name] and f"mean@{ns[name]}" in s for name, s in summaries.items())
    d = model_dir(out)
    assert [len(nanopr1.data.read_rows(d / f"{name}.jsonl")) for name in ns] == [2 * n for n in ns.values()]
    saved = json.loads((d / "summary.json").read_text())
    assert saved["datasets"] == summaries and {k: v["n"] for k, v in saved["keys"].items()} == ns
    assert ("mean@16" in printed and "mean@1 " in printed) == (extra == [])


def official_records(sources):
    """Records in verl's layout, as the official eval file: {data_source: (PROBLEMS indices, copies)}; the
    copies cycle through the problems (record k is problem k mod m), the chat holds an instruction + problem."""
    chat = lambda q: [{"role": "user", "content": f"Think in parallel where it helps.\n\nProblem: {q}"}]
    return [{"data_source": src, "prompt": chat(PROBLEMS[i]["question"]), "ability": "MATH",
             "reward_model": {"ground_truth": PROBLEMS[i]["answer"], "style": "rule"}}
            for src, (indices, copies) in sources.items() for _ in range(copies) for i in indices]


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def test_official_file_is_a_row_per_data_source(fake_sampler, bpe_tokenizer, tmp_path, capsys):
    """An official eval file (verl layout, several sets in one file, each problem repeated as n records): a row
    per data_source, one problem per prompt with n = its copies (Mean@4 here, Mean@1 for the set of single
    records), and each record's own chat sent as it is: the template is not wrapped around it again."""
    from nanopr1.format import chat_ids
    records = official_records({"APO_A": ([0, 1], 4), "APO_B": ([2, 3, 4], 1)})
    path = write_parquet(tmp_path / "official.parquet", records)
    summaries, printed = run_main(["--model", "m", "--datasets", path, "--out", str(tmp_path / "out"),
                                   "--no-progress"], capsys)
    assert list(summaries) == ["APO_A", "APO_B"]
    a, b = summaries["APO_A"], summaries["APO_B"]
    assert (a["problems"], a["n"], a["rollouts"]) == (2, 4, 8) and (b["problems"], b["n"], b["rollouts"]) == (3, 1, 3)
    assert a["mean@4"] == 0.5 and a["pass@4"] == 1.0 and b["mean@1"] == 1.0  # fake_text: even samples are right
    assert fake_sampler == [PROBLEMS[i]["question"] for i in range(5)]  # each prompt sampled once, for its n
    assert fake_sampler.prompts == [chat_ids(bpe_tokenizer, records[i]["prompt"]) for i in (0, 1, 8, 9, 10)]
    lines = [line.split() for line in printed.splitlines()]
    assert ["APO_A", "2"] == next(line for line in lines if line[:1] == ["APO_A"])[:2]
    d = model_dir(tmp_path / "out")
    assert [len(nanopr1.data.read_rows(d / f"{name}.jsonl")) for name in ("APO_A", "APO_B")] == [8, 3]


def test_the_real_official_file(bpe_tokenizer):
    """The released eval file: AIME25/24 and AMC23 at 16 copies (Mean@16), MATH300 at one (Mean@1), each
    prompt the file's own chat."""
    from nanopr1.format import chat_ids
    path = str(shared_file("official_apo_test_v3.parquet"))
    sets, ns = EVAL["load_sets"](EVAL["parse_args"](["--model", "m", "--datasets", path]))
    assert {k: (len(v), ns[k]) for k, v in sets.items()} == {"APO_AIME25": (30, 16), "APO_AIME24": (30, 16),
                                                               "APO_AMC23": (40, 16), "APO_MATH300": (316, 1)}
    p = sets["APO_AIME25"][0]
    assert p["answer"] == "70" and p["question"].endswith("is a divisor of $97_b.$")
    assert nanopr1.data.prompt_ids(bpe_tokenizer, PARALLEL_PROMPT, p) == chat_ids(bpe_tokenizer, p["chat"])
    limited, _ = EVAL["load_sets"](EVAL["parse_args"](["--model", "m", "--datasets", path, "--limit", "3"]))
    assert {k: len(v) for k, v in limited.items()} == dict.fromkeys(sets, 3)  # --limit: problems, not records


@pytest.mark.parametrize("records,message", [
    (official_records({"APO_A": ([0], 4)}) + official_records({"APO_A": ([1], 2)}),
     r"the prompts of APO_A repeat 2 to 4 times, so n is not one number: pass --n$"),
    ([dict(r, reward_model={"ground_truth": str(k)}) for k, r in enumerate(official_records({"APO_A": ([0], 2)}))],
     r"a prompt of APO_A has 2 gold answers \(0, 1\)$"),
])
def test_official_file_that_is_not_one_protocol(fake_sampler, tmp_path, records, message):
    path = write_parquet(tmp_path / "official.parquet", records)
    with pytest.raises(UsageError, match=message):
        main(["--model", "m", "--datasets", path, "--out", str(tmp_path / "out"), "--no-progress"])
    assert fake_sampler == [] and not (tmp_path / "out").exists()


def strict_or_lenient(question, j):
    """Sample j: right for both graders (j=0), right only for the lenient one (1, 2: the strict grader takes the
    answer line as written), wrong for both (3)."""
    gold = 2 * int(question.split()[2])
    return [f"so\nFinal Answer: {gold}", f"so\nFinal Answer: {gold}.", f"so\n**Final Answer:** {gold}",
            "so\nFinal Answer: -1"][j]


@pytest.mark.parametrize("extra,grader,correct,lenient", [
    ([], "dapo", [1, 0, 0, 0], "is_equiv"), (["--lenient-grader", "none"], "dapo", [1, 0, 0, 0], None),
    (["--grader", "is_equiv"], "is_equiv", [1, 1, 1, 0], None),  # the same grader twice: one set of columns
    (["--grader", "tests/custom_rewards.py:exact_match"], "tests/custom_rewards.py:exact_match", [1, 0, 1, 0],
     "is_equiv")])
def test_two_graders_side_by_side(fake_sampler, problems_file, tmp_path, capsys, monkeypatch, extra, grader, correct,
                                  lenient):
    """The paper's strict grader decides `correct`; the lenient one's Mean@n and Pass@k stand beside it, in the
    rows, summary.json and the table, so the gap is the share of the score that is formatting."""
    monkeypatch.setattr(sys.modules[__name__], "fake_text", strict_or_lenient)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    summaries, printed = run_main(["--model", "m", "--datasets", str(problems_file), "--n", "4", "--out", str(out),
                                   "--no-progress"] + extra, capsys)
    s = summaries["set"]
    assert s["grader"] == grader and s["mean@4"] == sum(correct) / 4
    rows = nanopr1.data.read_rows(model_dir(out) / "set.jsonl")
    assert [r["correct"] for r in rows[:4]] == [bool(c) for c in correct]
    assert all(r["grader"] == grader for r in rows)
    header, short = next(line for line in printed.splitlines() if line.startswith("dataset")), grader.split(":")[-1]
    assert f"mean@4 ({short})" in header and " pass@4 " in header  # a module:function by its name
    if lenient is None:
        assert "lenient" not in s and "lenient_correct" not in rows[0] and header.count("mean@4") == 1
        return
    assert s["lenient"] == {"grader": "is_equiv", "mean@4": 0.75, "pass@1": 0.75, "pass@2": 1.0, "pass@4": 1.0}
    assert [r["lenient_correct"] for r in rows[:4]] == [True, True, True, False]
    assert [r["lenient_answer"] for r in rows[:4]] == ["0", "0.", "0", "-1"]
    assert all(r["lenient_grader"] == "is_equiv" for r in rows)
    assert json.loads((model_dir(out) / "summary.json").read_text())["datasets"]["set"] == s
    cells = dict(zip(re.split(r"\s{2,}", header.strip()), printed.splitlines()[printed.splitlines().index(header) + 1]
                     .split()))
    assert cells["mean@4 (is_equiv)"] == "75.0" and cells["pass@4 (is_equiv)"] == "100.0"
    assert cells[f"mean@4 ({short})"] == f"{100 * s['mean@4']:.1f}"


def test_own_column_names(fake_sampler, tmp_path, capsys):
    """A file whose columns are not found by name: the error names --question-key, which eval.py takes."""
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"q": p["question"], "gold": p["answer"]}) + "\n" for p in PROBLEMS))
    args = ["--model", "m", "--datasets", str(path), "--n", "2", "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(UsageError, match=r"record 0 has no question column .*: pass --question-key$"):
        main(args)
    summaries, _ = run_main(args + ["--question-key", "q", "--answer-key", "gold"], capsys)
    assert summaries["mine"]["problems"] == 5 and summaries["mine"]["mean@2"] == 0.5


def test_an_out_that_is_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    def load(*a, **kw):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(nanopr1.model, "load_model", load)
    (tmp_path / "file").write_text("x")
    for out in ("file", "file/sub"):
        message = f"^--out {tmp_path}/{out}: {tmp_path}/file is a file, not a directory: choose another --out$"
        with pytest.raises(UsageError, match=message):
            main(["--model", "m", "--datasets", "toy-easy", "--out", str(tmp_path / out)])
    assert (tmp_path / "file").read_text() == "x"

# -----------------------------------------------------------------------------
# argument checks: one line, exit status 1, OUT untouched


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return init_toy_dir(tmp_path_factory.mktemp("toy") / "toy-model")


def snapshot(out):
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(out).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change,message", [
    (["--n", "0"], r"--n 0: must be 1 or more \(rollouts per problem\)"),
    (["--temperature", "0"], "--temperature 0 is greedy decoding: n identical rollouts are not a Mean@n"),
    (["--temperature", "-0.5"], "--temperature -0.5: must be positive"),
    (["--top-p", "0"], r"--top-p 0.0: must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p 1.5: must be in \(0, 1\]"),
    (["--num-paths", "1"], r"--num-paths 1: must be 2 or more \(paths in a parallel block; or pass --no-parallel\)"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be 1 or more"),
    (["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    (["--limit", "0"], "--limit 0: must be 1 or more"),
    (["--datasets", "toy-easy,nope"], "unknown dataset 'nope'"),
    (["--model", "/nonexistent/model"], "no such model directory"),
    (["--grader", "nope"], "unknown grader 'nope'"), (["--lenient-grader", "nope"], "unknown grader 'nope'"),
    (None, "--model is required"),  # None: no --model at all
])
def test_bad_arguments(toy_model, tmp_path, monkeypatch, capsys, change, message):
    """Each mistake: `error: <one line>` from the script's top level (exit status 1), and OUT as it was."""
    out = tmp_path / "out"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "set.jsonl").write_text("{}\n")
    before = snapshot(out)
    model, change = ([], []) if change is None else (["--model", toy_model], change)
    argv = model + ["--datasets", "toy-easy", "--limit", "2", "--n", "2", "--max-new-tokens", "8", "--out", str(out),
                    "--no-progress"] + change
    monkeypatch.setattr(sys, "argv", ["eval.py"] + argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "eval.py"), run_name="__main__")
    assert isinstance(e.value.code, str)  # a string exit code: printed to stderr, exit status 1
    assert e.value.code.startswith("error: ") and "\n" not in e.value.code
    assert re.search(message, e.value.code), e.value.code
    assert snapshot(out) == before


def test_bad_argument_exit_status_of_the_process(tmp_path):
    """The same, as a user sees it: status 1, one stderr line, no OUT created."""
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", "m", "--temperature", "0",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: --temperature 0 is greedy decoding") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_toy_preset_without_a_toy_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"no toy model yet: run `python train_sft.py --preset toy` first"):
        main(["--preset", "toy"])

# -----------------------------------------------------------------------------
# real end to end: the branching sampler on tiny random models


@pytest.mark.parametrize("extra,template", [([], PARALLEL_PROMPT), (["--no-parallel"], SEQUENTIAL_PROMPT),
                                            (["--prompt-file", "PROMPT"], "Q: {problem}\nA:"),
                                            (["--variant", "unseen"], PARALLEL_PROMPT)],
                         ids=["parallel", "sequential", "prompt-file", "unseen"])
def test_end_to_end_tiny_model(problems_file, tmp_path, capsys, bpe_tokenizer, extra, template):
    tokenizer = bpe_tokenizer
    model = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    (tmp_path / "prompt.txt").write_text("Q: {problem}\nA:")
    extra = [str(tmp_path / "prompt.txt") if a == "PROMPT" else a for a in extra]
    out = tmp_path / "out"
    summaries, printed = run_main(["--model", str(model), "--datasets", str(problems_file), "--limit", "3", "--n",
                                   "2", "--max-new-tokens", "24", "--out", str(out), "--no-progress"] + extra, capsys)
    d = model_dir(out)
    assert d.name.startswith("model-sequential-" if "--no-parallel" in extra else "model-")
    rows = nanopr1.data.read_rows(d / "set.jsonl")
    assert len(rows) == 6 and all(1 <= r["length"] <= 24 for r in rows)
    key = json.loads((d / "keys.json").read_text())["set"]
    assert key["template"] == template and key["parallel"] == ("--no-parallel" not in extra)
    assert key["variant"] == ("unseen" if "unseen" in extra else "seen")
    s = summaries["set"]
    assert s == ev.summarize(rows, 2) and s["problems"] == 3
    assert "mean@2" in printed and "pass@2" in printed and "\nset " in printed


def test_toy_preset_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    init_toy_dir(tmp_path / "out" / "toy-sft")
    summaries, printed = run_main(["--preset", "toy", "--limit", "2", "--max-new-tokens", "24", "--no-progress"],
                                  capsys)
    assert list(summaries) == ["toy-easy", "toy-hard"]
    assert all(s["grader"] == "is_equiv" and "lenient" not in s for s in summaries.values())  # the toy's grader
    assert all(s["problems"] == 2 and s["rollouts"] == 8 for s in summaries.values())  # n = 4 in the toy preset
    assert "out/toy-sft (parallel, seen), n=4" in printed
    assert len(list((tmp_path / "out" / "eval").glob("toy-sft-*/toy-hard.jsonl"))) == 1


TOY_ARGS = ["--preset", "toy", "--datasets", "toy-easy", "--limit", "5", "--n", "2", "--batch-size", "2",
            "--max-new-tokens", "24", "--no-progress"]


def rows_of(out):
    return [(r["problem"], r["sample"], r["text"]) for r in nanopr1.data.read_rows(model_dir(out) / "toy-easy.jsonl")]


def test_new_weights_or_seed_are_recomputed(tmp_path, capsys):
    """Same --out, same model path: new weights, then another seed, each give the rows of a fresh run."""
    model = init_toy_dir(tmp_path / "model", seed=0)
    shared = ["--model", model, "--out", str(tmp_path / "out")] + TOY_ARGS
    first, printed = run_main(shared, capsys)
    again, printed = run_main(shared, capsys)
    assert again == first and "recomputing" not in printed
    old = rows_of(tmp_path / "out")
    init_toy_dir(tmp_path / "model", seed=1)  # retrained in place
    cases = [([], "weights"), (["--seed", "1"], "seed")]
    for i, (extra, field) in enumerate(cases):
        summaries, printed = run_main(shared + extra, capsys)
        assert f"toy-easy was evaluated with other settings ({field})" in printed
        fresh, _ = run_main(["--model", model, "--out", str(tmp_path / f"fresh{i}")] + TOY_ARGS + extra, capsys)
        assert summaries == fresh and rows_of(tmp_path / "out") == rows_of(tmp_path / f"fresh{i}") != old
        old = rows_of(tmp_path / "out")


def test_a_run_dir_with_a_new_checkpoint_is_recomputed(tmp_path, capsys):
    """A training run's dir (its model: the newest OUT/checkpoint-*) evaluated, then checkpointed again with new
    weights: the same --model path now means other weights, and eval recomputes."""
    from accelerate import Accelerator
    from nanopr1 import checkpoint
    run_dir, acc = tmp_path / "run", Accelerator(cpu=True)
    checkpoint.save(run_dir, 1, acc, lambda d: init_toy_dir(d, seed=0))
    shared = ["--model", str(run_dir), "--out", str(tmp_path / "out")] + TOY_ARGS
    run_main(shared, capsys)
    checkpoint.save(run_dir, 2, acc, lambda d: init_toy_dir(d, seed=1))
    _, printed = run_main(shared, capsys)
    assert "toy-easy was evaluated with other settings (weights)" in printed


def test_two_models_share_an_out(tmp_path, capsys):
    """Two models named alike (a/model, b/model) into one --out: a sub-directory each; the first is not redone."""
    a, b = init_toy_dir(tmp_path / "a" / "model", seed=0), init_toy_dir(tmp_path / "b" / "model", seed=1)
    out = tmp_path / "out"
    first, _ = run_main(["--model", a, "--out", str(out)] + TOY_ARGS, capsys)
    (d,) = out.iterdir()
    before = snapshot(d)
    table, printed = run_main(["--model", f"{a},{b}", "--out", str(out)] + TOY_ARGS, capsys)
    assert sorted(table) == [f"{a}/toy-easy", f"{b}/toy-easy"] and table[f"{a}/toy-easy"] == first["toy-easy"]
    dirs = sorted(out.iterdir())
    assert len(dirs) == 2 and all(p.name.startswith("model-") for p in dirs)
    assert {k: v[0] for k, v in snapshot(d).items() if k.endswith(".jsonl")} == \
        {k: v[0] for k, v in before.items() if k.endswith(".jsonl")}  # a's rows kept, not resampled
    rows = [nanopr1.data.read_rows(p / "toy-easy.jsonl") for p in dirs]
    assert len(rows[0]) == len(rows[1]) == 10 and rows[0] != rows[1]


EXIT_ABORT = """import ctypes, os
if "RANK" in os.environ:  # a torchrun worker, not the launcher
    libc = ctypes.CDLL(None)
    libc.__cxa_atexit(libc.abort, None, None)  # run by exit(), with the C++ destructors
"""


def abort_at_exit(tmp_path):
    """A PYTHONPATH whose sitecustomize makes each rank abort (SIGABRT) if it reaches the C-level exit, where
    static destructors run: a gloo thread's destructor there once aborted a finished rank under load. A
    rank that ends after its work without that teardown (os._exit) is immune; one that does not fails."""
    import ctypes
    if not hasattr(ctypes.CDLL(None), "__cxa_atexit"):
        return ""  # not glibc / libSystem: nothing planted
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(EXIT_ABORT)
    return str(tmp_path / "site")


def test_two_processes_equal_one(toy_model, tmp_path, capsys):
    """torchrun, 2 CPU processes (gloo): eval.py writes one merged table with the same rows and summary
    as one process; train_rl's --eval-every hook (evaluation.evaluate_everywhere) returns the
    single-process summary on both ranks. No rank reaches the interpreter's teardown (abort_at_exit)."""
    site = abort_at_exit(tmp_path)
    argv = ["--model", toy_model] + TOY_ARGS + ["--datasets", "toy-easy,toy-hard"]
    argv[argv.index("--n")] = "--rollouts"  # torchrun would read --n as an abbreviation of its own flags
    run_main(argv + ["--out", str(tmp_path / "one")], capsys)
    model, tokenizer = nanopr1.model.load_model(toy_model)
    _, hook = ev.evaluate_everywhere(model, tokenizer, nanopr1.data.load_problems("toy-easy")[:5], 2, lambda rows: rows,
                                     template=toy.TEMPLATE, max_new_tokens=24, seed=0)
    two = tmp_path / "two"
    proc = run(ROOT / "eval.py", *argv, "--out", str(two), procs=2, env={"PYTHONPATH": f"{site}:{ROOT}"})
    assert "(2 processes)" in proc.stderr  # the script saw a world of 2
    d1, d2 = model_dir(tmp_path / "one"), model_dir(two)
    for name in ("toy-easy", "toy-hard"):
        assert (d2 / f"{name}.jsonl").read_text() == (d1 / f"{name}.jsonl").read_text()
    assert json.loads((d2 / "summary.json").read_text()) == json.loads((d1 / "summary.json").read_text())
    assert not list(d2.glob("*.rank*"))
    run(ROOT / "tests" / "dist_eval.py", str(two), toy_model, procs=2, env={"PYTHONPATH": f"{site}:{ROOT}"})
    for r in range(2):
        got = json.loads((two / f"run_eval.rank{r}.json").read_text())
        assert got.pop("world") == 2 and got == hook


def test_paired_difference_closed_form():
    """Per-problem means (2 samples each) of a and b: differences 0.5, 0, -0.5, 1 -> mean 0.25,
    standard error sd / sqrt(4) with the sample sd."""
    a = [row(p, j, c) for p, cs in enumerate([(0, 0), (1, 0), (1, 1), (0, 0)]) for j, c in enumerate(cs)]
    b = [row(p, j, c) for p, cs in enumerate([(1, 0), (1, 0), (1, 0), (1, 1)]) for j, c in enumerate(cs)]
    m, se = ev.paired_difference(a, b)
    d = [0.5, 0.0, -0.5, 1.0]
    sd = (sum((x - 0.25) ** 2 for x in d) / 3) ** 0.5
    assert m == pytest.approx(0.25) and se == pytest.approx(sd / 2)


def test_one_cache_serves_every_batch(toy_model):
    """eval.py hands one KV cache to every sample() call of every set (its captured steps kept): the same
    rows as a cache made per call."""
    from nanopr1.kvcache import KVCache
    model, tokenizer = nanopr1.model.load_model(toy_model)
    problems = nanopr1.data.load_problems("toy-easy")[:6]
    kw = dict(template=toy.TEMPLATE, max_new_tokens=40, seed=0, batch_size=2, progress=False)
    cache = KVCache(16, 80, "cpu", use_graphs=True)  # the CPU stand-in of the captured steps
    with_cache, _ = ev.evaluate(model, tokenizer, problems, 2, cache=cache, **kw)
    per_call, _ = ev.evaluate(model, tokenizer, problems, 2, **kw)
    assert [r["text"] for r in with_cache] == [r["text"] for r in per_call] and cache.captured.graphs
