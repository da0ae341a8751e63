"""Command-line and process plumbing shared by the scripts: the one-line error type, the --help layout, argparse
types for numeric flags, the hub check before a download, and the process/device/seed set-up of torchrun."""
import argparse
import hashlib
import math
import os
import shutil
import socket
import sys
import textwrap

import torch
import torch.distributed as dist


class UserError(ValueError):
    """A problem with the user's input or environment; the scripts print its one-line message and exit."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring as written, and every flag's default after its help. A default of
    None (the help text says what happens) or False (a switch that is off) is not shown: it would say nothing."""

    def _get_help_string(self, action):
        hidden = action.default is None or action.default is False  # `in (None, False)` would hide a default of 0
        return action.help if hidden else super()._get_help_string(action)

    def __init__(self, prog, width=None, max_help_position=30):  # 100 columns: one line for most flags
        super().__init__(prog, width=width or min(100, shutil.get_terminal_size().columns),
                         max_help_position=max_help_position)

    def _split_lines(self, text, width):  # never break "--data-path" or "SiT-XL/2" at a hyphen
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _format_usage(self, usage, actions, groups, prefix):  # the flags are listed below, grouped
        return super()._format_usage(usage or "%(prog)s [flags]", actions, groups, prefix)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' --help layout, whose errors are one line like every other error (see cli).
    late_help: --help is answered by parse_args, after the caller has set defaults from a first parse_known_args
    (train.py's presets), so that it shows the values a run will use."""

    def __init__(self, late_help=False, **kwargs):
        super().__init__(formatter_class=HelpFormatter, add_help=not late_help, **kwargs)
        self.late_help = late_help
        if late_help:
            self.add_argument("-h", "--help", action="store_true", help="show this help (with the preset's values)")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if self.late_help:
            if parsed.help:
                self.print_help()
                self.exit()
            del parsed.help
        return parsed

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


# argparse types for numeric flags: a bad value is refused when the command line is read, before any work.
def number(kind, low=None, high=None, low_open=False, high_open=False, what=None):
    """A type that parses kind (int or float) and checks low <= x <= high (< with *_open); what names the range."""
    def parse(s):
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low)) or \
                (high is not None and (x >= high if high_open else x > high)):
            raise argparse.ArgumentTypeError(f"{s} is out of range: must be {what}")
        return x
    return parse


positive_int = number(int, 1, what=">= 1")
nonneg_int = number(int, 0, what=">= 0")
positive_float = number(float, 0, low_open=True, what="> 0")
nonneg_float = number(float, 0, what=">= 0")
probability = number(float, 0, 1, what="in [0, 1]")


def cli(main):
    """Run a script's main; a UserError exits with its one line, also one that a DataLoader worker re-raised
    (those arrive with the worker's traceback in the message: the last line is the error)."""
    try:
        return main()
    except UserError as e:
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1])


def online(host="huggingface.co", timeout=3.0):
    """Whether the weight hubs can be reached: False at once with HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), else a
    connection to host within timeout seconds. Without it, a download fails only after 30-45 s of the hub's retries."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_hub(repo_id, files, flag):
    """Before loading default weights from the Hugging Face hub (repo_id, one of files): offline, cached weights still
    load (the hub is told to use its cache; its flag is read when huggingface_hub is imported, too early for us) and
    missing ones fail at once, naming flag, instead of after the hub's retries."""
    if online():
        return
    import huggingface_hub
    import huggingface_hub.constants
    if repo_id and not any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, f), str) for f in files):
        raise UserError(f"no network, and {repo_id} is not in the Hugging Face cache; download it where there is one "
                        f"and pass {flag} PATH")
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def check_file(path, fix, flag=None):
    """One line, naming fix, for a path that should be a readable file but is missing, a folder or unreadable."""
    name = f"{flag} {path}" if flag else path
    if os.path.isdir(path):
        raise UserError(f"{name} is a folder, not a file; {fix}")
    if not os.path.isfile(path):
        raise UserError(f"{name}: no such file; {fix}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{name} cannot be read (no read permission); make it readable, or {fix}")


def check_writable(folder, name, fix):
    """One line, naming fix, before any work, if folder (existing, or to be made with the folders missing above it)
    cannot be written: the nearest existing path at or above it is a file or not writable. name: the flag and value
    the line starts with."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):  # missing folders are made
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        why = "not writable" if os.path.isdir(parent) else "a file, not a folder"
        raise UserError(f"{name}: {parent} is {why}; {fix}")


def check_device(device):
    """torch.device(device), or a one-line error for a device that is not here (--device cuda without a GPU)."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {device}: no such CUDA GPU is visible here; pass --device cpu")
    return device


def init_processes():
    """torchrun's environment -> (ddp, rank, world, device): one process per GPU with NCCL, or gloo on CPU; a plain
    `python script.py` is rank 0 of 1. The GPU is made current, so that NCCL and new tensors use it."""
    ddp = "RANK" in os.environ
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    return ddp, rank, world, device


def broadcast_from_rank0(tensors):
    """Every rank ends with rank 0's values of these tensors (a fit done on every rank, made identical)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.broadcast(t, 0)


def seeded_generator(seed, *keys, device="cpu"):
    """A torch generator seeded by (seed, *keys), e.g. (seed, step) for a training step's noise. The key is hashed
    because CPU generators keep only the low 32 bits of a seed: seed * 2**32 + i would ignore the seed."""
    h = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(h, "little") & (2 ** 63 - 1))


def preset_epilog(presets, names, unset):
    """train.py's --help epilog: each preset as the flags it sets (presets: flag -> one value per name in names;
    unset marks a flag the preset leaves alone), a switch shown as the switch (--flip, --no-flip)."""
    def flag(k, v):
        name = k.replace("_", "-")
        if isinstance(v, bool):
            return f"--{'' if v else 'no-'}{name}"
        return f"--{name}\0{'derived' if v is None else v}"
    width = max(map(len, names)) + 3
    lines = [f"  {'latent':{width - 2}s}the flags' own defaults (SiT's recipe) and the mode's"]
    for i, name in enumerate(names):
        flags = " ".join(flag(k, v[i]) for k, v in presets.items() if v[i] is not unset)
        lines.append(textwrap.fill(f"  {name:{width - 2}s}{flags}", 100, subsequent_indent=" " * width,
                                   break_on_hyphens=False))
    return "presets (the defaults above are the chosen preset's; a flag given wins):\n" + \
        "\n".join(lines).replace("\0", " ")


def reason(e, limit=100):
    """An exception as a short reason for a one-line error: its type and first words, cut at a word, not mid-word."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
