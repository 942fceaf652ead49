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


def test_the_stated_size_is_the_size():
    """The README's line count of the Python outside tests/ and bench/ is the real one, and no file is over
    350 lines: the size is part of being readable."""
    files = list((ROOT / "nanopr1").glob("*.py")) + list(ROOT.glob("*.py")) + list((ROOT / "bench").glob("*.py"))
    lines = {p: len(p.read_text().splitlines()) for p in files}
    stated = re.search(r"and `bench/`: ([\d,]+) lines", (ROOT / "README.md").read_text()).group(1)
    assert sum(n for p, n in lines.items() if p.parent.name != "bench") == int(stated.replace(",", ""))
    assert max(lines.values()) <= 350, max(lines, key=lines.get)
