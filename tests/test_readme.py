"""The README's commands that run on a CPU in seconds, run as written: its "From Python" section."""

import re

from conftest import ROOT, init_toy_dir


def test_from_python_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"## From Python\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    init_toy_dir("out/toy-hard", seed=0)  # an untrained toy model where the snippet looks
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("tokens, ") == 2 and printed.count("answer: ") == 2 and "gold: 6" in printed


def test_the_reading_order_is_the_import_graph():
    """The README lists the package files in reading order: each imports only files listed above it (no
    import cycles, and a reader never meets a name from a file not read yet)."""
    import ast
    listing = re.search(r"## Files\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    order = [m for m in re.findall(r"^  (\w+)\.py", listing, re.MULTILINE)]
    files = sorted(p.stem for p in (ROOT / "nanopr1").glob("*.py"))
    assert sorted(order) == files
    for module in order:
        tree = ast.parse((ROOT / "nanopr1" / f"{module}.py").read_text())
        imported = {node.module.split(".")[1] if "." in node.module else a.name
                    for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("nanopr1") for a in node.names}
        later = {m for m in imported & set(order) if order.index(m) > order.index(module)}
        assert not later, f"{module}.py imports {later}, listed after it"


# The budget is 3,000 code lines; the official recipe's graders and rules, the run guards and the 4B GPU
# path took the code past it. The ceiling is today's size: code that grows it must say why in its commit.
CODE_LINES_CEILING = 3_465
CORE = ("format", "attention", "rollout", "sampler", "kvcache", "rewards", "grpo", "scoring", "train_sft",
        "train_rl")


def line_kinds(source):
    """Each line of a Python source as "blank", "docstring", "comment" (a comment on its own line) or "code"."""
    import ast
    import io
    import tokenize
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT and not source.splitlines()[t.start[0] - 1][:t.start[1]].strip()}
    return ["blank" if not line.strip() else "docstring" if i in docstrings else "comment" if i in comments
            else "code" for i, line in enumerate(source.splitlines(), 1)]


def test_line_kinds_counts_what_it_says():
    source = '"""Module."""\n\n# a step\nx = 1  # trailing\ndef f():\n    """Doc\n    more."""\n    return "#"\n'
    assert line_kinds(source) == ["docstring", "blank", "comment", "code", "code", "docstring", "docstring",
                                  "code"]


def test_the_stated_size_is_the_size():
    """The README's count of the code lines outside tests/ and bench/ is the real one and under the ceiling
    (comments, docstrings and blank lines are not counted: narration is never traded for the budget); no
    file is over 350 lines; each core file is at least 10% comments on their own line."""
    files = list((ROOT / "nanopr1").glob("*.py")) + list(ROOT.glob("*.py")) + list((ROOT / "bench").glob("*.py"))
    kinds = {p: line_kinds(p.read_text()) for p in files}
    code = sum(k.count("code") for p, k in kinds.items() if p.parent.name != "bench")
    stated = re.search(r"and `bench/`: ([\d,]+) code lines", (ROOT / "README.md").read_text()).group(1)
    assert code == int(stated.replace(",", "")) and code <= CODE_LINES_CEILING
    assert max(len(k) for k in kinds.values()) <= 350, max(kinds, key=lambda p: len(kinds[p]))
    quiet = {p.stem: f"{k.count('comment') / len(k):.1%}" for p, k in kinds.items()
             if p.stem in CORE and k.count("comment") < 0.1 * len(k)}
    assert not quiet, f"own-line comments below 10% of the lines: {quiet}"
