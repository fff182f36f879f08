"""The man pages in doc/ against the code: alsd(8) names every subcommand and option of
the argument parsers, alsd.toml(5) every key of the configuration with its default (and
no key that does not exist), and both render without a warning from groff and man.

A new option or setting without documentation fails here."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from alsd import cli, config

DOC = Path(__file__).resolve().parents[2] / "doc"
ALSD_8 = DOC / "alsd.8"
ALSD_TOML_5 = DOC / "alsd.toml.5"


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The daemon's parser (key "") and each subcommand's, as the command line uses them."""
    out = {"": cli.build_parser()}
    for name, (module, _) in cli.SUBCOMMANDS.items():
        out[name] = importlib.import_module(module)._parser(name)
    return out


def unescape(roff: str) -> str:
    """The roff escapes these pages use, as plain text."""
    for esc, text in (("\\(dq", '"'), ("\\(lq", '"'), ("\\(rq", '"'), ("\\-", "-"), ("\\e", "\\")):
        roff = roff.replace(esc, text)
    return roff


def sections(page: Path) -> dict[str, str]:
    """Source text per .SH and .SS heading (unescaped); a .SS heading is keyed by itself,
    and its text is also part of the enclosing .SH."""
    out: dict[str, str] = {}
    sh = ss = None
    for line in unescape(page.read_text()).splitlines():
        m = re.match(r"\.(SH|SS)\s+(.*)", line)
        if m:
            title = m.group(2).strip().strip('"')
            if m.group(1) == "SH":
                sh, ss = title, None
            else:
                ss = title
            out.setdefault(title, "")
            continue
        for key in (sh, ss):
            if key is not None:
                out[key] += line + "\n"
    return out


def documented(text: str, word: str) -> bool:
    """``word`` appears in ``text`` as a whole word (``--config`` not inside ``--configx``)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# ------------------------------------------------------------------ alsd(8)


def test_every_subcommand_has_a_section() -> None:
    secs = sections(ALSD_8)
    assert set(cli.SUBCOMMANDS) == {
        title.removeprefix("alsd ") for title in secs if title.startswith("alsd ")
    }


def undocumented(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """What of ``parser`` (and of its own subcommands, such as ``profile show``) the
    man page text does not name."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue  # -h/--help: documented once, for every command
        if action.option_strings:
            missing += [o for o in action.option_strings if not documented(text, o)]
            default = action.default
            numeric = isinstance(default, int) and not isinstance(default, bool) and default
            if numeric and not documented(text, str(default)):
                missing.append(f"{action.option_strings[0]}'s default {default}")
        elif isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if not documented(text, name):
                    missing.append(name)
                missing += [f"{name} {m}" for m in undocumented(sub, text)]
        else:
            # A positional: its metavar (FILE|REF, SRC, ...) names it in the section.
            metavar = action.metavar or action.dest.upper()
            names = [m for m in re.split(r"[|\s]", str(metavar)) if m]
            missing += [m for m in names if not documented(text, m)]
    return missing


@pytest.mark.parametrize("name", ["", *cli.SUBCOMMANDS])
def test_every_option_and_argument_is_documented(name: str) -> None:
    parser = parsers()[name]
    text = sections(ALSD_8)["OPTIONS" if name == "" else f"alsd {name}"]
    if name == "":
        # The daemon's own options; the commands are checked by their own sections.
        parser._actions = [
            a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)
        ]
    missing = undocumented(parser, text)
    assert not missing, f"alsd.8 does not document for 'alsd {name}': {missing}"


def test_help_is_documented_once_for_every_command() -> None:
    secs = sections(ALSD_8)
    assert documented(secs["OPTIONS"], "--help")
    assert documented(secs["COMMANDS"], "--help")


def test_exit_statuses_are_documented() -> None:
    text = sections(ALSD_8)["EXIT STATUS"]
    for status, words in (("0", "Success"), ("1", "failed"), ("2", "Usage or configuration")):
        assert re.search(rf"^\.B {status}\n(.*\n)*?.*{words}", text, re.M), status


# ------------------------------------------------------------------ alsd.toml(5)


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def documented_settings() -> dict[str, str]:
    """{dotted key: the tag's value} from the .TP entries under SETTINGS."""
    out: dict[str, str] = {}
    table = None
    lines = unescape(ALSD_TOML_5.read_text()).splitlines()
    in_settings = False
    for i, line in enumerate(lines):
        if line.startswith(".SH"):
            in_settings = line.strip() == ".SH SETTINGS"
        if not in_settings:
            continue
        if line.startswith(".SS"):
            title = line[3:].strip().strip('"')
            table = None if title == "Top level" else title.strip("[]")
        elif line == ".TP":
            m = re.fullmatch(r"\.B (\w+) = (.*)", lines[i + 1])
            assert m, f"alsd.toml.5: a .TP tag that is not '.B key = value': {lines[i + 1]!r}"
            key = m.group(1) if table is None else f"{table}.{m.group(1)}"
            value = m.group(2)
            if lines[i + 2] == "(unset)":  # "key = PATH" then "(unset)": optional
                assert re.fullmatch(r"[A-Z:]+", value), key
                value = "(unset)"
            out[key] = value
    return out


def test_every_setting_is_documented_with_its_default() -> None:
    expected = {
        key: "(unset)" if default is None else toml_literal(default)
        for key, default, _ in config.iter_settings()
    }
    assert documented_settings() == expected


def test_the_shipped_config_agrees_with_the_page() -> None:
    # Not a second list to keep: config/alsd.toml is the page's example of every key.
    shipped = (DOC.parent / "config" / "alsd.toml").read_text()
    for key, value in documented_settings().items():
        name = key.rsplit(".", 1)[-1]
        if value == "(unset)":
            assert re.search(rf"^# {name} = ", shipped, re.M), key
        else:
            assert re.search(rf"^{name} = {re.escape(value)}$", shipped, re.M), key


# ------------------------------------------------------------------ rendering


@pytest.mark.parametrize("page", [ALSD_8, ALSD_TOML_5], ids=lambda p: p.name)
def test_groff_renders_without_warnings(page: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (Debian: groff-base)")
    r = subprocess.run(
        ["groff", "-man", "-ww", "-z", "-Tutf8", str(page)], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("page", [ALSD_8, ALSD_TOML_5], ids=lambda p: p.name)
def test_man_renders_without_warnings(page: Path) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (Debian: man-db)")
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MANPAGER="cat", PAGER="cat")
    r = subprocess.run(
        ["man", "--warnings=all", "-l", str(page)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    title = page.name.rsplit(".", 1)[0].upper()
    assert r.stdout.startswith(title), r.stdout[:80]
