"""The README's commands that run on a CPU in seconds, run as written: its "From Python" section."""

import re

from conftest import ROOT
from nanopr1 import toy


def test_from_python_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"## From Python\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    toy.init_dir("out/toy-hard", seed=0)  # an untrained toy model where the snippet looks
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("tokens, ") == 2 and printed.count("answer: ") == 2 and "gold: 6" in printed
