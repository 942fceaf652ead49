"""docs/fidelity.md's nanopr1 column is the code's defaults: each cell is rebuilt from the parsers, the
recipes and the package, so the table cannot drift from the code."""

import re
import runpy

import pytest

from conftest import ROOT
from nanopr1 import recipes, rollout
from nanopr1.format import normalize


def table():
    """{setting: nanopr1 cell} of docs/fidelity.md's table."""
    rows = [line.split(" | ") for line in (ROOT / "docs" / "fidelity.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| setting") and not line.startswith("|---")]
    return {r[0].lstrip("| "): r[3] for r in rows}


def defaults(script):
    return runpy.run_path(str(ROOT / script), run_name="not_main")["parser"].get_default


def expected():
    """The nanopr1 column, rebuilt from the code."""
    rl, sft = defaults("train_rl.py"), defaults("train_sft.py")
    easy, hard, s2 = (recipes.recipe(*k) for k in [("easy", "seen"), ("hard", "seen"), ("hard", "unseen")])
    between = normalize("<Parallel><Path>a</Path><Path>b</Path></Parallel>  <Summary>s</Summary>")
    between = between.split("</Parallel>")[1].split("<Summary>")[0].replace("\n", "\\n")
    ends = "(the rollout ends after it)" if rl("rules") == "official" else "(new blocks stop)"
    return {
        "block layout": f"`</Parallel>{between}<Summary>`",
        "grader, hard stage and benchmarks": f"`{hard['grader']}`",
        "grader, easy stage": f"`{easy['grader']}` with reward `{easy['reward']}` (+1 / -1)",
        "path budget": str(rollout.OFFICIAL_PATH_TOKENS if rl("rules") == "official" else None),
        "block limit": f"{rl('max_blocks')} {ends}",
        "response cut": str(rl("max_new_tokens")),
        "prompt length": f"{rl('max_prompt_tokens')} (longer prompts left out, and counted)",
        "temperature, top-p": f"{rl('temperature')}, {rl('top_p')}",
        "batch": f"{hard['prompts_per_step']} x {hard['group_size']}",
        "mini-batch": str(rl("mini_batches")),
        "clip": f"{rl('clip_low')} / {recipes.clip_high(hard['reward'])} (S2: {recipes.clip_high(s2['reward'])}), "
                f"dual {rl('dual_clip')}",
        "KL": str(rl("kl_coef")),
        "lr": f"{rl('lr')}, wd {rl('weight_decay')}",
        "S2 reward": s2["reward"],
        "steps": f"easy {easy['steps']}, hard {hard['steps']}",
        "easy stage": f"{easy['prompts_per_step']} x {easy['group_size']}, {easy['steps']} steps",
        "SFT": f"batch {sft('batch_size')}, max length {sft('max_len')}, {sft('epochs')} epochs, lr {sft('lr')}",
    }


@pytest.mark.parametrize("setting", list(expected()))
def test_the_nanopr1_column_is_the_code(setting):
    assert table()[setting] == expected()[setting]


def test_every_row_says_why_or_same():
    rows = [line.split(" | ") for line in (ROOT / "docs" / "fidelity.md").read_text().splitlines()
            if re.match(r"\| [a-zA-Z]", line) and not line.startswith("| setting")]
    assert len(rows) >= 20 and all(len(r) == 5 and r[4].strip(" |") for r in rows)
