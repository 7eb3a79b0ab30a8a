"""What the command lines share: `--help` shows every option's help and default; the old spellings of
the moved tools name the new ones."""

import argparse
import importlib
import re
import runpy

import pytest

from convert.__main__ import build_parser as convert_parser
from sparge_jax.tools.pictures import build_parser as pictures_parser
from sparge_jax.tools.sample import build_parser as sample_parser
from train.cli import build_parser as train_parser
from train.prepare import build_parser as prepare_parser

PARSERS = {"sample": sample_parser, "pictures": pictures_parser, "convert": convert_parser, "train": train_parser,
           "prepare": prepare_parser}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_shows_every_option_with_help_and_default(name):
    parser = PARSERS[name]()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"{name}: {label} has no help text"
        help_text = " ".join(action.help.split())
        if action.option_strings and not action.required and action.default is not None:
            assert f"{help_text} (default: {action.default})" in text, f"{name}: {label}"
        else:  # required, or None: no default shown, the help says what leaving it out does
            assert f"{help_text} (default:" not in text, f"{name}: {label}"
            if action.option_strings and not action.required:
                assert re.search(r"default|needed with", help_text), f"{name}: {label}: {help_text}"


def test_sample_help_warns_about_the_cost_of_its_defaults():
    text = " ".join(sample_parser().format_help().split())
    assert "--steps STEPS sampling steps (default: 50)" in text
    assert "(default 21 60 104: 480p 81 frames; costly on a CPU" in text
    assert "32,760 tokens" in text and "CPU" in text


@pytest.mark.parametrize("old,new,script", [("sparge_jax.sample", "sparge_jax.tools.sample", "sparge-sample"),
                                            ("sparge_jax.pictures", "sparge_jax.tools.pictures", "sparge-pictures")])
def test_old_tool_spellings_name_the_new_ones(old, new, script, capsys):
    """`python -m sparge_jax.sample` (run here as runpy does for -m) exits 2 with one line naming
    the new module and console script; importing the old module raises ImportError saying the same."""
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(old, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"python -m {new}" in lines[0] and f"`{script}`" in lines[0], lines
    with pytest.raises(ImportError) as import_info:
        importlib.import_module(old)
    assert str(import_info.value) == lines[0].removeprefix("error: ")
