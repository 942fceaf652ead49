"""Tests for eval.py: the unbiased Pass@k against brute force, the summary and table,
grading and resuming with a stand-in sampler, and real end-to-end runs on tiny models."""

import importlib.util
import itertools
import json
import random
from pathlib import Path

import pytest

import nanopr1.model
import nanopr1.sampler
from conftest import tiny_model
from nanopr1.format import PARALLEL_PROMPT, SEQUENTIAL_PROMPT

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("nanopr1_eval", ROOT / "eval.py")
ev = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ev)

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
                                             "format%", "length"]
    assert table.splitlines()[1].split() == ["aime25", "2", "25.0", "25.0", "50.0", "50.0", "75.0", "25"]

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


@pytest.fixture
def fake_sampler(monkeypatch, bpe_tokenizer):
    """Replace sampler.sample; record which questions were sampled. Its rollouts are built by make_rollout,
    the tags of fake_text tokenized as tag tokens (rewards judge the structure from tokens)."""
    calls = []

    def sample(model, tokenizer, prompts, group_size=1, **kw):
        out = []
        for p in prompts:
            question = next(q["question"] for q in PROBLEMS if q["question"] in tokenizer.decode(p))
            calls.append(question)
            for j in range(group_size):
                ids = tokenizer(fake_text(question, j), add_special_tokens=False)["input_ids"]
                out.append(nanopr1.sampler.make_rollout(tokenizer, p, ids + [tokenizer.eos_token_id], "eos"))
        return out
    monkeypatch.setattr(nanopr1.sampler, "sample", sample)
    monkeypatch.setattr(nanopr1.model, "load", lambda *a, **kw: (tiny_model(bpe_tokenizer), bpe_tokenizer))
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


def run_main(args, monkeypatch, capsys):
    summaries = ev.main(args)
    return summaries, capsys.readouterr().out


def test_resume_from_a_truncated_jsonl(fake_sampler, problems_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--model", "m", "--datasets", str(problems_file), "--n", "4", "--batch-size", "2", "--out", str(out),
            "--no-progress"]
    first, printed = run_main(args, monkeypatch, capsys)
    assert "set" in printed and "mean@4" in printed and "50.0" in printed
    jsonl = out / "set.jsonl"
    full = jsonl.read_text()
    assert len(full.splitlines()) == 20 and len(fake_sampler) == 5
    # kill it mid-write: problems 0-2 complete, problem 3 half written, a torn last line
    lines = full.splitlines(keepends=True)
    jsonl.write_text("".join(lines[:14]) + lines[14][:30])
    fake_sampler.clear()
    second, _ = run_main(args, monkeypatch, capsys)
    assert fake_sampler == [PROBLEMS[3]["question"], PROBLEMS[4]["question"]]  # only the unfinished problems
    assert second == first
    assert sorted(jsonl.read_text().splitlines()) == sorted(full.splitlines())
    assert json.loads((out / "summary.json").read_text())["datasets"]["set"] == first["set"]
    # a third run has nothing left to sample
    fake_sampler.clear()
    assert run_main(args, monkeypatch, capsys)[0] == first and fake_sampler == []


def test_resume_refuses_other_settings_or_problems(fake_sampler, problems_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--model", "m", "--datasets", str(problems_file), "--n", "2", "--out", str(out), "--no-progress"]
    run_main(args, monkeypatch, capsys)
    with pytest.raises(SystemExit, match="other settings"):
        run_main(args + ["--temperature", "0.6"], monkeypatch, capsys)
    problems_file.write_text("".join(json.dumps(dict(p, question=p["question"] + "!")) + "\n" for p in PROBLEMS))
    with pytest.raises(SystemExit, match="other problems"):
        run_main(args, monkeypatch, capsys)


@pytest.mark.parametrize("argv,message", [
    (["--datasets", "aime25"], "--model is required"),
    (["--model", "/nonexistent/model", "--datasets", "toy-easy"], "no such model directory"),
    (["--model", "/nonexistent/model", "--datasets", "toy-easy,nope"], "unknown dataset 'nope'"),
])
def test_clear_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        ev.main(argv + ["--out", str(tmp_path / "o")])


def test_toy_preset_without_a_toy_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"no toy model yet: run `python train_sft.py --preset toy` first"):
        ev.main(["--preset", "toy"])

# -----------------------------------------------------------------------------
# real end to end: the branching sampler on tiny random models


@pytest.mark.parametrize("extra,template", [([], PARALLEL_PROMPT), (["--no-parallel"], SEQUENTIAL_PROMPT),
                                            (["--prompt-file", "PROMPT"], "Q: {problem}\nA:"),
                                            (["--variant", "unseen"], PARALLEL_PROMPT)],
                         ids=["parallel", "sequential", "prompt-file", "unseen"])
def test_end_to_end_tiny_model(problems_file, tmp_path, capsys, bpe_tokenizer, extra, template):
    tokenizer = bpe_tokenizer
    model_dir = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "prompt.txt").write_text("Q: {problem}\nA:")
    extra = [str(tmp_path / "prompt.txt") if a == "PROMPT" else a for a in extra]
    out = tmp_path / "out"
    summaries = ev.main(["--model", str(model_dir), "--datasets", str(problems_file), "--limit", "3", "--n", "2",
                         "--max-new-tokens", "24", "--out", str(out), "--no-progress"] + extra)
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "set.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(1 <= r["length"] <= 24 for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["template"] == template and config["parallel"] == ("--no-parallel" not in extra)
    assert config["variant"] == ("unseen" if "unseen" in extra else "seen")
    s = summaries["set"]
    assert s == ev.summarize(rows, 2) and s["problems"] == 3
    assert "mean@2" in printed and "pass@2" in printed and "\nset " in printed


def test_toy_preset_end_to_end(tmp_path, monkeypatch, capsys):
    from nanopr1 import toy
    monkeypatch.chdir(tmp_path)
    toy.init_dir(tmp_path / "out" / "toy-sft")
    summaries = ev.main(["--preset", "toy", "--limit", "2", "--max-new-tokens", "24", "--no-progress"])
    printed = capsys.readouterr().out
    assert list(summaries) == ["toy-easy", "toy-hard"]
    assert all(s["problems"] == 2 and s["rollouts"] == 8 for s in summaries.values())  # n = 4 in the toy preset
    assert printed.startswith("out/toy-sft (parallel, seen), n=4")
    assert (tmp_path / "out" / "eval" / "toy-sft" / "toy-hard.jsonl").is_file()
