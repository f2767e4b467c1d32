"""What the scripts share: their command-line flags and how they write results (atomically, CSV + Markdown tables,
PNG + PDF figures).

    from script_io import add_common_args, resolve_common, save_table, save_figure, write_atomic
"""
import dataclasses
import os
import re
import tempfile
import time
from pathlib import Path

import torch


def resolve_device(name):
    """'auto' -> CUDA when present, else the CPU; 'cpu', 'cuda' or 'cuda:N' as given, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but this torch ({torch.__version__}) sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def write_atomic(path, write):
    """Call write(tmp_path) on a temporary file beside path, then rename it over path: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results and checkpoints are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_table(df, stem, view=None):
    """A results table as stem.csv (full precision) and stem.md (the formatted view, when given, else df)."""
    write_atomic(f"{stem}.csv", lambda tmp: df.to_csv(tmp, index=False))
    markdown = (df if view is None else view).to_markdown(index=False)
    write_atomic(f"{stem}.md", lambda tmp: Path(tmp).write_text(markdown + "\n"))


def save_figure(fig, stem, dpi=300):
    """A figure as PNG (dpi) and PDF: stem.png, stem.pdf."""
    for ext, metadata in (("png", {}), ("pdf", {"CreationDate": None})):  # no date: the same run, the same bytes
        write_atomic(f"{stem}.{ext}", lambda tmp: fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight",
                                                              metadata=metadata))


def add_training_args(parser):
    """The flags of scripts that may train cells."""
    parser.add_argument("--jobs", type=int, default=None,
                        help="cells trained at once, in worker processes (default: one per CPU core, at most one per "
                             "cell; a cell's result does not depend on it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per cell (default 1; a cell's CPU arithmetic depends on it)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="stop training before MINUTES have passed, saving resume states of unfinished cells")


def add_common_args(parser, out_help=None):
    """The flags every experiment script shares."""
    from train import CKPT_DIR, SEED  # train.py imports this module, so its facts are read at call time
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed (default {SEED}, the paper's)")
    parser.add_argument("--quick", action="store_true", help="tiny configuration, seconds on a CPU")
    parser.add_argument("--ckpt-dir", type=Path, default=None,
                        help=f"checkpoint folder (default {CKPT_DIR}, {CKPT_DIR}/quick with --quick)")
    if out_help:
        parser.add_argument("--out", type=Path, default=None, help=out_help)


def resolve_common(parser, args, default_out=None):
    """(config, device, ckpt_dir, out) from the common flags, each checked (a usage error names the bad flag);
    --quick changes the defaults, not explicit paths."""
    from train import CKPT_DIR, PAPER, QUICK
    cfg = QUICK if args.quick else PAPER
    if getattr(args, "epochs", None) is not None:
        if args.epochs < 1:
            parser.error(f"--epochs must be at least 1, got {args.epochs}")
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    heads = getattr(args, "heads", None)
    for h in [heads] if isinstance(heads, int) else heads or []:
        if h < 1 or cfg.embed_dim % h:
            parser.error(f"--heads: a head count must divide embed_dim={cfg.embed_dim}, got {h}")
    for flag in ("jobs", "threads"):
        if (getattr(args, flag, None) or 1) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if getattr(args, "time_budget", None) is not None and args.time_budget <= 0:
        parser.error(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    ckpt_dir = args.ckpt_dir or (CKPT_DIR / "quick" if args.quick else CKPT_DIR)
    out = getattr(args, "out", None) or (default_out and (Path("results/quick") if args.quick else Path(default_out)))
    return cfg, device, ckpt_dir, out


def deadline_of(minutes):
    """--time-budget MINUTES counted from now, as an absolute time.time(); None for no budget."""
    return None if minutes is None else time.time() + 60 * minutes
