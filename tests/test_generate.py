"""Cold-start corpus generation (train_sft.py --generate): which teacher traces are kept, resuming
after a kill, refusing another run's corpus, and a corpus that depends on neither the number of
processes nor --gen-batch. The teacher is faked in-process (sampler.sample monkeypatched) where the
test needs kept traces or a kill; the real sampler with an untrained toy teacher elsewhere (its traces
are nearly all rejected, for reasons that change with every seed: the decisions are compared)."""

import json
import runpy
from pathlib import Path

import pytest

from conftest import ROOT, init_toy_dir, run
from nanopr1 import UsageError, data, sampler, toy
from nanopr1.rollout import Rollout
from nanopr1.sampler import mix

GOOD = "Think.\n<Parallel>\n<Path>a = 3</Path>\n<Path>b = 3</Path>\n</Parallel>\n<Summary>3</Summary>\nFinal Answer: 3"
CANON = "Think.\n<Parallel><Path>a = 3</Path><Path>b = 3</Path></Parallel>\n<Summary>3</Summary>\nFinal Answer: 3"
ONE_PATH = "<Parallel><Path>a</Path></Parallel><Summary>s</Summary>Final Answer: 3"


@pytest.mark.parametrize("text, response, reason", [
    ("<think>let me see</think>" + GOOD, CANON, None),  # thinking dropped, layout normalised
    (GOOD, CANON, None),
    ("<think>a</think>b</think>\n" + GOOD, CANON, None),  # the text after the LAST </think>
    ("<think>" + GOOD + "</think>No block.\nFinal Answer: 3", None, "no parallel block"),  # a block in the thinking
    (GOOD.replace("Final Answer: 3", "Final Answer: 4"), None, "wrong final answer"),
    (GOOD.replace("Final Answer: 3", ""), None, "wrong final answer"),  # no answer at all
    (GOOD.replace("\nFinal Answer: 3", "").replace("b = 3", "Final Answer: 3"), None, "wrong final answer"),  # in a path
    # the token parser's reasons, without token indices and cut at ':'
    (ONE_PATH, None, "the block has 1 path(s)"),
    (GOOD.replace("<Summary>3</Summary>", ""), None, "</Parallel> is not followed by <Summary>"),
    ("x <Parallel><Path>a</Path><Path>b</Path>\nFinal Answer: 3", None,
     "expected </Parallel> after its last path"),  # text between paths
    ("x <Parallel><Path>a</Path><Path>b</Path>", None,
     "expected </Parallel> after its last path"),  # cut off by the budget
    ("x <Parallel><Path>a</Path><Path>b", None, "<Path> is never closed by </Path>"),
    ("x <Parallel><Path>a<Parallel>", None, "<Parallel> inside the <Path>"),
    ("x </Path> <Parallel>", None, "</Path> outside a parallel block"),
    ("No block at all.\nFinal Answer: 3", None, "no parallel block"),
])
def test_judge_trace(bpe_tokenizer, text, response, reason):
    assert data.judge_trace(text, "3", bpe_tokenizer) == (response, reason)


def test_judge_trace_reads_tag_tokens(bpe_tokenizer, monkeypatch):
    """Judged after tokenizing, as the trainer will read the trace: tags that become sub-word pieces
    (here: a tokenizer that splits special tokens) are text, and the trace has no block."""
    assert data.judge_trace(GOOD, "3", bpe_tokenizer) == (CANON, None)
    monkeypatch.setattr(bpe_tokenizer, "split_special_tokens", True)
    assert data.judge_trace(GOOD, "3", bpe_tokenizer) == (None, "no parallel block")

# -----------------------------------------------------------------------------
# the script, with a fake teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An untrained toy model dir (with its tokenizer) and a bare prompt template in it."""
    path = init_toy_dir(tmp_path_factory.mktemp("teacher") / "toy")
    (Path(path) / "prompt.txt").write_text("{problem}")
    return Path(path)


def write_problems(path, n, answer="3"):
    path.write_text("".join(json.dumps({"question": f"Find x in {i} 3.", "answer": answer}) + "\n" for i in range(n)))
    return path


def argv(tmp_path, teacher, out="corpus.jsonl", *extra):
    return ["--generate", "--teacher", str(teacher), "--prompt-file", str(teacher / "prompt.txt"), "--source",
            str(tmp_path / "problems.jsonl"), "--data", str(tmp_path / out), "--gen-max-new-tokens", "24", *extra]


def generate(args, capsys):
    """Run the generator in-process; its printed report."""
    script = runpy.run_path(str(ROOT / "train_sft.py"))  # the script's functions, as `python train_sft.py` runs them
    script["main"](script["parse_args"](args))
    return capsys.readouterr().out


def corpus(path):
    """What a finished run leaves: the corpus file's bytes, and its settings and rejections."""
    assert not list(Path(path).parent.glob(Path(path).name + ".rank*"))  # merged and removed
    return Path(path).read_bytes(), json.loads(Path(f"{path}.meta.json").read_text())


def fake_teacher(monkeypatch, write, fail_at=None, log=None):
    """sampler.sample replaced by a teacher that writes write(question, seed) for each prompt (the seeds as
    the real sampler derives them); it logs the questions of each call and raises on call `fail_at` (a kill)."""
    log = [] if log is None else log

    def sample(model, tokenizer, prompts, **kw):
        assert kw["parallel"] is False
        if len(log) + 1 == fail_at:
            raise RuntimeError("killed")
        seeds = kw["seed"] if isinstance(kw["seed"], list) else [mix(kw["seed"], j) for j in range(len(prompts))]
        questions = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        log.append(questions)
        return [Rollout(p, [], [], [], [], [], [], write(q, s), "eos") for p, q, s in zip(prompts, questions, seeds)]
    monkeypatch.setattr(sampler, "sample", sample)
    return log


def seeded(question, seed):
    """A trace that shows its seed: the seed in a path, and correct for even seeds only."""
    answer = "Final Answer: 3" if seed % 2 == 0 else "Final Answer: 4"
    return "<think>hm</think>" + GOOD.replace("a = 3", f"a = {seed}").replace("Final Answer: 3", answer)


def test_kept_traces_are_normalised_well_formed_with_a_block_and_correct(tmp_path, teacher, monkeypatch, capsys):
    """--generate: the teacher's thinking is dropped, the trace normalised, and only well-formed traces with
    a block and the right final answer are kept, in problem order; the rest is counted by reason."""
    texts = ["<think>let me see</think>" + GOOD, GOOD.replace("Final Answer: 3", "Final Answer: 4"), ONE_PATH,
             "No block at all.\nFinal Answer: 3", "<think>" + GOOD + "</think>No block.\nFinal Answer: 3", GOOD]
    write_problems(tmp_path / "problems.jsonl", len(texts))
    fake_teacher(monkeypatch, lambda q, seed: texts[int(q.split()[3])])
    report = generate(argv(tmp_path, teacher, "corpus.jsonl", "--gen-batch", "4"), capsys)
    kept = data.read_rows(tmp_path / "corpus.jsonl")
    assert kept == [{"index": i, "question": f"Find x in {i} 3.", "answer": "3", "response": CANON} for i in (0, 5)]
    assert "kept 2/6 (33.3%)" in report and "6 sampled now on 1 process" in report
    assert "{'no parallel block': 2, 'wrong final answer': 1, 'the block has 1 path(s)': 1}" in report
    # the SFT reader takes the corpus as it is
    examples, dropped = data.sft_examples(data.load_problems(tmp_path / "corpus.jsonl"), toy.build_tokenizer(), "{problem}", 512)
    assert len(examples) == 2 and not dropped


def test_a_killed_run_resumes_where_it_stopped(tmp_path, teacher, monkeypatch, capsys):
    """Killed after 2 batches (4 of 7 problems) and a torn half line, killed again after one more batch,
    then run to the end: no problem is sampled twice and the corpus equals an uninterrupted run's; one
    more run samples nothing and changes nothing."""
    write_problems(tmp_path / "problems.jsonl", 7)
    fake_teacher(monkeypatch, seeded)
    generate(argv(tmp_path, teacher, "whole.jsonl", "--gen-batch", "2"), capsys)
    args = argv(tmp_path, teacher, "corpus.jsonl", "--gen-batch", "2")
    log = fake_teacher(monkeypatch, seeded, fail_at=3)
    with pytest.raises(RuntimeError, match="killed"):
        generate(args, capsys)
    assert not (tmp_path / "corpus.jsonl").exists()
    with open(tmp_path / "corpus.jsonl.rank0.jsonl", "a") as f:
        f.write('{"index": 4, "rejec')  # killed mid-write
    fake_teacher(monkeypatch, seeded, fail_at=4, log=log)
    with pytest.raises(RuntimeError, match="killed"):
        generate(args, capsys)
    fake_teacher(monkeypatch, seeded, log=log)
    report = generate(args, capsys)
    assert "6/7 problems decided before" in report and "1 sampled now" in report
    sampled = [q for call in log for q in call]
    assert sorted(sampled) == [f"Find x in {i} 3." for i in range(7)]  # each problem once, over the three runs
    assert corpus(tmp_path / "corpus.jsonl") == corpus(tmp_path / "whole.jsonl")
    assert len(data.read_rows(tmp_path / "whole.jsonl")) == 4  # the even seeds: a corpus worth comparing
    report = generate(args, capsys)
    assert len(log) == 4 and "0 sampled now" in report and "kept 4/7" in report
    assert corpus(tmp_path / "corpus.jsonl") == corpus(tmp_path / "whole.jsonl")


@pytest.mark.parametrize("change, message", [
    (["--seed", "1"], r"corpus.jsonl holds a corpus generated with other settings \(seed\)"),
    (["--gen-max-new-tokens", "30"], r"other settings \(max_new_tokens\)"),
    (["--teacher", "TEACHER2"], r"other settings \(teacher\)"),
    (["--source", "OTHER"], r"other settings \(source, problems\)"),
    ([], r"unknown settings \(no corpus.jsonl.meta.json\)"),  # a hand-made corpus.jsonl
])
def test_another_runs_corpus_is_refused_unless_overwrite(tmp_path, teacher, monkeypatch, capsys, change, message):
    """A corpus made with other settings (or not by --generate) is left byte for byte as it was, with a
    one-line error (exit 1 from the script); --overwrite replaces it with what a fresh run makes."""
    write_problems(tmp_path / "problems.jsonl", 4)
    paths = {"OTHER": write_problems(tmp_path / "other.jsonl", 5), "TEACHER2": tmp_path / "teacher2"}
    if "TEACHER2" in change:
        init_toy_dir(paths["TEACHER2"], seed=1)
    change = [str(paths.get(c, c)) for c in change]
    fake_teacher(monkeypatch, seeded)
    if change:
        generate(argv(tmp_path, teacher), capsys)
    else:
        (tmp_path / "corpus.jsonl").write_text(json.dumps({"question": "q", "answer": "1", "response": "r"}) + "\n")
    files = {f: f.read_bytes() for f in tmp_path.glob("corpus*")}
    with pytest.raises(UsageError, match=message):
        generate(argv(tmp_path, teacher, "corpus.jsonl", *change), capsys)
    if change[:1] == ["--seed"]:  # through the script, as a user runs it
        proc = run(ROOT / "train_sft.py", *argv(tmp_path, teacher, "corpus.jsonl", *change), check=False)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "other settings (seed)" in proc.stderr
        assert len(proc.stderr.strip().split("\n")) == 1, proc.stderr
    assert {f: f.read_bytes() for f in tmp_path.glob("corpus*")} == files
    generate(argv(tmp_path, teacher, "corpus.jsonl", *change, "--overwrite"), capsys)
    generate(argv(tmp_path, teacher, "fresh.jsonl", *change), capsys)
    assert corpus(tmp_path / "corpus.jsonl") == corpus(tmp_path / "fresh.jsonl")  # the settings too

# -----------------------------------------------------------------------------
# the real sampler with an untrained toy teacher


def toy_problems(path, n):
    path.write_text("".join(json.dumps(r) + "\n" for r in toy.eval_set("easy", n)))


def test_gen_batch_does_not_change_the_corpus(tmp_path, teacher, capsys):
    """One seed per problem: --gen-batch 1 and 3 make the same decisions; --seed 1 makes others (the
    comparison can tell seeds apart: the untrained teacher's traces fail in many ways)."""
    toy_problems(tmp_path / "problems.jsonl", 9)
    runs = {}
    for name, extra in [("b1", ["--gen-batch", "1"]), ("b3", ["--gen-batch", "3"]), ("s1", ["--seed", "1"])]:
        generate(argv(tmp_path, teacher, f"{name}.jsonl", *extra), capsys)
        runs[name] = corpus(tmp_path / f"{name}.jsonl")
    assert runs["b1"] == runs["b3"]
    rejected = runs["b1"][1]["rejected"]
    assert len({r["rejected"] for r in rejected}) >= 3 and rejected != runs["s1"][1]["rejected"]


def test_two_processes_make_the_same_corpus_as_one(tmp_path, teacher):
    """torchrun with 2 real processes (gloo): each problem sampled once, on its rank; the merged corpus,
    its rejections and the reported counts equal a single process's."""
    toy_problems(tmp_path / "problems.jsonl", 10)
    logs = {procs: run(ROOT / "train_sft.py", *argv(tmp_path, teacher, f"p{procs}.jsonl", "--gen-batch", "2"),
                       procs=procs).stdout for procs in (1, 2)}
    assert "10 sampled now on 2 processes" in logs[2] and "10 sampled now on 1 process" in logs[1]
    assert corpus(tmp_path / "p1.jsonl") == corpus(tmp_path / "p2.jsonl")
    report = {procs: next(line for line in logs[procs].splitlines() if line.startswith("kept")) for procs in logs}
    assert report[2].replace("p2.jsonl", "p1.jsonl").replace("2 processes", "1 process") == report[1]
