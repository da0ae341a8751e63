"""Experiment and maintenance scripts, run from the repository root as modules: python -m experiments.bench, ...

They train the way a user does: `python train.py FLAGS` in a process of its own (run_script), never by importing
train.py, and read what the run writes (log.jsonl, last.pt).
"""
import os
import subprocess
import sys

from support.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, where the scripts are


def last_line(text):
    """The last line a terminal would show of a script's stderr: a progress bar's \\r-updates collapsed."""
    lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
    return next((line for line in reversed(lines) if line), "(nothing on stderr)")


def run_script(name, script, flags, quiet=False):
    """`python SCRIPT FLAGS` from the repository root, as a user runs it (train.py, prepare.py). Its stdout is ours
    (quiet: discarded), its stderr is kept; a failure is a one-line UserError naming the run (name) and the last
    line of that stderr: the script's own one-line error, or the last line of a traceback."""
    r = subprocess.run([sys.executable, script, *map(str, flags)], cwd=ROOT, check=False, text=True,
                       stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE)
    if r.returncode != 0:
        said = last_line(r.stderr).removeprefix("error: ")  # the scripts' own errors start so
        raise UserError(f"{name}: {script} failed (exit status {r.returncode}): {said}")
