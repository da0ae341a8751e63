"""The command lines of every script: each flag has a help text, and `--help` shows the values a run will use."""
import argparse
import subprocess
import sys

import pytest

from experiments import ablation
from experiments import bench
from experiments import convergence
import fid
import prepare
import sample
import train

ROOT = __file__.rsplit("/tests/", 1)[0]


class Captured(Exception):
    pass


@pytest.mark.parametrize("parse", [train.get_args, sample.get_args, fid.get_args, prepare.get_args, bench.get_args,
                                   ablation.main, convergence.get_args],
                         ids=["train", "sample", "fid", "prepare", "bench", "ablation", "convergence"])
def test_every_flag_has_help(parse, monkeypatch):
    def capture(parser, *a, **k):
        raise Captured(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(Captured) as info:
        parse([])
    parser = info.value.args[0]
    flags = [a for a in parser._actions if a.option_strings]
    assert len(flags) > 3
    missing = [a.option_strings[0] for a in flags if not a.help or not a.help.strip()]
    assert missing == []


def test_help_shows_the_preset_values():
    demo = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    latent = subprocess.run([sys.executable, "train.py", "--preset", "latent", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert demo.returncode == 0 and latent.returncode == 0
    squash = lambda s: " ".join(s.split())
    assert "(default: DiT-T/4)" in squash(demo.stdout)  # no data: the demo preset
    assert "(default: SiT-XL/2)" in squash(latent.stdout)
    assert "all noise (default: 0)" in squash(latent.stdout)  # a default of 0 is a value, not "off": shown
    assert "(default: False)" not in latent.stdout and "(default: None)" not in latent.stdout  # they say nothing


def test_presets_and_explicit_flags():
    assert train.get_args([]).preset == "demo" and train.get_args([]).max_steps == 600
    a = train.get_args(["--data-path", "/somewhere"])
    assert (a.preset, a.model, a.global_batch_size, a.lr, a.space) == ("latent", "SiT-XL/2", 256, 1e-4, "latent")
    p = train.get_args(["--data-path", "/somewhere", "--space", "pixel"])
    assert (p.preset, p.global_batch_size, p.beta2) == ("pixel", 1024, 0.95)
    assert (train.derive(p).lr, train.derive(p).prediction) == (5e-5 * 1024 / 256, "x")  # JiT's lr rule
    # flags given win over the preset, also abbreviated ones (argparse resolves them before the preset applies)
    assert train.get_args(["--max-st", "7"]).max_steps == 7
    assert train.get_args(["--preset", "latent", "--glob", "64"]).lr == 1e-4


@pytest.mark.parametrize("script", ["bench", "ablation", "convergence", "digits"])
def test_experiments_run_as_modules_and_train_as_a_user_does(script):
    # `python -m experiments.X` from the repository root: its --help names that command, and the script trains
    # through `python train.py` processes, never by importing train.py (DESIGN.md: no script imports train.py)
    r = subprocess.run([sys.executable, "-m", f"experiments.{script}", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and f"python -m experiments.{script}" in r.stdout
    assert f"python {script}.py" not in r.stdout
    probe = f"import sys, experiments.{script}; print('train' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
