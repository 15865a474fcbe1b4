"""Every command the README shows runs as written: each concrete `edgeslim` line of the README's
bash blocks runs, in order, from a fresh folder holding the shipped specs and device profiles,
with 2 trials per search; every command of the synopsis has at least one such example."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"\b[A-Z]{1,}[A-Z_,.]*\b|\[|\||\.\.\.")


def readme_commands() -> tuple[list[list[str]], set[str]]:
    """(concrete command lines as argv lists, the command names the synopsis lines name)."""
    text = (ROOT / "README.md").read_text()
    concrete, synopsis = [], set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if not line.startswith("edgeslim "):
                continue
            words = line.split()
            if PLACEHOLDER.search(line.replace("--", " ")):
                synopsis.add(words[1])
            else:
                concrete.append(shlex.split(line))
    return concrete, synopsis


def _tiny(argv: list[str]) -> list[str]:
    """The same command with 2 trials per search or worker."""
    if argv[1] not in ("search", "worker"):
        return argv
    if "--trials" in argv:
        i = argv.index("--trials")
        return argv[:i + 1] + ["2"] + argv[i + 2:]
    return argv + ["--trials", "2"]


def test_the_readme_synopsis_has_a_runnable_example_for_every_command():
    concrete, synopsis = readme_commands()
    from edgeslim.search.cli import _build_parser

    commands = set(_build_parser()._subparsers._group_actions[0].choices)  # every registered command
    examples = {argv[1] for argv in concrete}
    assert synopsis <= commands
    assert commands <= examples, f"README lacks a runnable example of {sorted(commands - examples)}"


def test_every_readme_command_runs_as_written_from_a_fresh_folder(tmp_path):
    (tmp_path / "studies").mkdir()
    for spec in (ROOT / "studies").glob("*.toml"):
        shutil.copy(spec, tmp_path / "studies" / spec.name)
    shutil.copytree(ROOT / "studies" / "devices", tmp_path / "studies" / "devices")
    concrete, _ = readme_commands()
    assert len(concrete) >= 10
    for argv in concrete:
        argv = _tiny(argv)
        run = subprocess.run([sys.executable, "-m", "edgeslim.search.cli", *argv[1:]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)
        allowed = (0, 3) if argv[1] == "pick" else (0,)  # pick exits 3 when no variant fits the budgets
        assert run.returncode in allowed, (" ".join(argv), run.returncode, run.stderr[-2000:])
        assert "Traceback" not in run.stderr, (" ".join(argv), run.stderr[-2000:])
