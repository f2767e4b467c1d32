"""What the scripts share: their command-line flags (checked), the device, the output folder and the atomic writers.

    from script_io import add_common_args, add_training_args, add_evaluation_args     # flags
    from script_io import resolve_common, resolve_training, resolve_evaluation        # the flags, checked
    from script_io import write_atomic, save_table, save_figure                       # never a half-written file

Every check is a usage error that names the flag, what was expected and what was found (argparse's exit status 2).
"""
import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # files, never windows
import matplotlib.pyplot as plt

from config import CKPT_DIR, PAPER, QUICK, SEED, TASKS
from official import authors_folder, fetch_official


@contextlib.contextmanager
def input_errors(parser):
    """Bad input met while running (a truncated or foreign checkpoint, a file that cannot be written) as one line on
    stderr, `prog: error: ...`, exit status 2, no traceback."""
    try:
        yield
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def comma_list(parser, flag, text, allowed=None):
    """A comma-separated flag's items as a tuple, each among `allowed` where given; else the parser's error."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    if not items or (allowed and any(item not in allowed for item in items)):
        parser.error(f"{flag}: expected a comma-separated list" + (f" of {', '.join(allowed)}" if allowed else "")
                     + f", got {text!r}")
    return tuple(items)


def check_writable(parser, folder, flag="--out"):
    """Create `folder` and write a file in it now, so that a run that could not save its results refuses at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        parser.error(f"{flag} {folder}: expected a folder this user can create and write, but "
                     f"{error.strerror or error}")


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


def hardware_name(device):
    """The GPU's or CPU's model name, for the training facts and the benchmark."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else (platform.processor() or platform.machine())


def synchronize(device):
    """Wait for the device's queued work (a timing on a GPU would otherwise stop before its kernels end)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _glibc(name):
    """A function of glibc's malloc (mallopt, malloc_trim), or None on a libc without it (macOS's, musl's)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h, and the defaults restored afterwards
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def freed_memory_kept():
    """Within it, glibc keeps freed memory for the next allocation instead of handing it back to the system. By
    default every block over 32 MiB is mapped afresh and its pages faulted in one by one on first touch: the studies
    of a language model's layer allocate and free tens of 75 MB temporaries (9 heads x 1,024^2 float64), and those
    faults were a quarter of their time (docs/pretrained.md). Yields release(), which hands the kept memory back
    (malloc_trim): call it between units of work, so that the peak stays that of one unit. Afterwards glibc's default
    limits are set back (its sliding mmap threshold then stays at 128 KiB). Nothing changes where glibc is not the C
    library (release does nothing)."""
    mallopt, trim = _glibc("mallopt"), _glibc("malloc_trim")
    if mallopt is None or trim is None:
        yield lambda: None
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 1 << 40)
    try:
        yield lambda: trim(0)
    finally:
        mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        trim(0)


@contextlib.contextmanager
def intra_op_threads(threads):
    """torch's intra-op thread count set to `threads` (None: left as it is) inside the block, restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


REPO = Path(__file__).resolve().parent


def portable_path(path):
    """A path as a committed report shows it, naming no folder of the machine that made it: relative to this repo
    where it lies inside, else .../its name."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return f".../{path.name}"


def command_line(argv):
    """A command as a committed report shows it: `python` and its arguments, any absolute path made portable."""
    return "python " + " ".join(portable_path(arg) if arg.startswith("/") else arg for arg in argv)


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


def write_text(path, text):
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def save_table(df, stem, view=None):
    """A results table as stem.csv (full precision) and stem.md (the formatted view, when given, else df)."""
    write_atomic(f"{stem}.csv", lambda tmp: df.to_csv(tmp, index=False))
    write_text(f"{stem}.md", (df if view is None else view).to_markdown(index=False) + "\n")


def table_view(table):
    """The Markdown view of a table: floats to 3 significant digits (the theory's bounds span 1e2 to 1e29; the
    quantisation study's KL divergences 1e-4 to 1)."""
    view = table.copy()
    for column in view.columns:
        if view[column].dtype == float:
            view[column] = view[column].map(lambda x: f"{x:.3g}")
    return view


def save_figure(fig, stem, dpi=300):
    """A figure as PNG (dpi) and PDF, stem.png and stem.pdf; then closed."""
    for ext, metadata in (("png", {}), ("pdf", {"CreationDate": None})):  # no date: the same run, the same bytes
        write_atomic(f"{stem}.{ext}", lambda tmp: fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight",
                                                              metadata=metadata))
    plt.close(fig)


def deadline_of(minutes):
    """--time-budget MINUTES counted from now, as an absolute time.time(); None for no budget."""
    return None if minutes is None else time.time() + 60 * minutes


def add_common_args(parser, out_help=None, official=False):
    """The flags every experiment script shares; official=True adds --official (the authors' released models)."""
    if official:
        parser.add_argument("--official", action="store_true",
                            help="evaluate the authors' 8 released checkpoints: fetched once from their repository "
                                 "at a pinned commit into the user's cache and checked by SHA-256; output to "
                                 "results/official by default")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed (default {SEED}, the paper's)")
    parser.add_argument("--quick", action="store_true", help="tiny configuration, seconds on a CPU")
    parser.add_argument("--ckpt-dir", type=Path, default=None,
                        help=f"checkpoint folder (default {CKPT_DIR}, {CKPT_DIR}/quick with --quick)")
    if out_help:
        parser.add_argument("--out", type=Path, default=None, help=out_help)


def add_training_args(parser):
    """The flags of scripts that may train cells."""
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of the cells trained now (default {PAPER.epochs}, {QUICK.epochs} with --quick)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="cells trained at once, in worker processes (default: one per CPU core, at most one per "
                             "cell; a cell's result does not depend on it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per cell (default: the CPU's cores shared among the cells that train "
                             "at once; a cell's CPU arithmetic depends on it, and it is recorded)")
    parser.add_argument("--group", choices=("yes", "no"), default="no",
                        help="yes: train the cells of each head count together in this process, all in every step "
                             "(one vmapped step; see docs/speed.md for its measured speed). no (default): one cell per "
                             "worker process")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="stop training before MINUTES have passed, saving resume states of unfinished cells")


def add_evaluation_args(parser, heads):
    """The flags of the scripts that evaluate the (heads, task) models: --heads (default `heads`), --tasks, --seeds,
    --retrain, the training flags (for missing checkpoints), the common flags, --out and --official."""
    parser.add_argument("--heads", type=int, nargs="+", default=list(heads), help=f"head counts (default {heads})")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                        help="evaluate every training run instead of one: seed --seed's checkpoints in CKPT_DIR, "
                             "seed S's in CKPT_DIR/seeds/seed_S; trains nothing; writes OUT/seeds/")
    parser.add_argument("--with-authors", action="store_true",
                        help="with --seeds (or theory.py --amplification): the authors' released models as one "
                             "more run, shown beside ours and "
                             "never pooled (read from the cache or ../shared/official_checkpoints, else fetched as "
                             "--official does)")
    parser.add_argument("--retrain", action="store_true", help="train every cell even if its checkpoint exists")
    add_training_args(parser)
    add_common_args(parser, out_help="output folder (default results; results/quick with --quick, "
                                     "results/official with --official)", official=True)


def results_folder(quick):
    """Where results go without --out: results/, or results/quick/ for a --quick run."""
    return Path("results/quick") if quick else Path("results")


def resolve_common(parser, args, epochs=None):
    """(config, device, ckpt_dir) from the common flags: --quick (QUICK, else PAPER, with `epochs` where given),
    --device and --ckpt-dir; --quick changes the defaults, not explicit paths."""
    cfg = QUICK if args.quick else PAPER
    if epochs is not None:
        if epochs < 1:
            parser.error(f"--epochs must be at least 1, got {epochs}")
        cfg = dataclasses.replace(cfg, epochs=epochs)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    return cfg, device, args.ckpt_dir or (CKPT_DIR / "quick" if args.quick else CKPT_DIR)


def resolve_training(parser, args):
    """resolve_common with --epochs, after checking --heads and the training flags (--jobs, --threads,
    --time-budget)."""
    embed_dim = (QUICK if args.quick else PAPER).embed_dim
    for h in args.heads:
        if h < 1 or embed_dim % h:
            parser.error(f"--heads: a head count must divide embed_dim={embed_dim}, got {h}")
    for flag, value in (("jobs", args.jobs), ("threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    return resolve_common(parser, args, epochs=args.epochs)


def _check_seeds(parser, args):
    """--seeds names each training run once, never --seed's own, and evaluates what exists."""
    clash = [flag for flag, given in (("--official", args.official), ("--retrain", args.retrain)) if given]
    if clash:
        parser.error(f"--seeds evaluates the checkpoints that exist (the authors' among them); it cannot be "
                     f"combined with {', '.join(clash)}")
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1} | ({args.seed} & set(args.seeds)))
    if repeated:
        parser.error(f"--seeds: each training run once, and not --seed ({args.seed}, read from CKPT_DIR itself); "
                     f"repeated: {' '.join(map(str, repeated))}")


def _official_folder(parser, args):
    """--official: the authors' checkpoints, fetched and verified; exit status 1 when they cannot be had."""
    clash = [flag for flag, given in (("--ckpt-dir", args.ckpt_dir), ("--quick", args.quick),
                                      ("--retrain", args.retrain)) if given]
    if clash:
        parser.error(f"--official evaluates the authors' paper-scale checkpoints; it cannot be combined with "
                     f"{', '.join(clash)}")
    try:
        return fetch_official()
    except RuntimeError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")


def authors_checkpoints(parser, args):
    """--with-authors: the folder of the authors' 8 verified checkpoints (the cache or the shared copy, else fetched;
    exit status 1 when they cannot be had); None without the flag, whatever a cache holds."""
    if not args.with_authors:
        return None
    try:
        return authors_folder() or fetch_official()
    except RuntimeError as error:
        parser.exit(1, f"{parser.prog}: error: --with-authors: {error}\n")


def resolve_evaluation(parser, args, several_runs=None):
    """(config, device, ckpt_dir, out) of an evaluation script: resolve_training, then --seeds, --with-authors
    (only where the study has several runs: several_runs, by default --seeds given) and --official checked
    (--official fetches the authors' models: ckpt_dir is their folder), and the output folder, created and checked:
    --out, else results (results/quick with --quick, results/official with --official); OUT/seeds with --seeds."""
    cfg, device, ckpt_dir = resolve_training(parser, args)
    if args.seeds is not None:
        _check_seeds(parser, args)
    if args.with_authors and not (args.seeds is not None if several_runs is None else several_runs):
        parser.error("--with-authors adds the authors' run to a study over several runs: give --seeds too")
    if args.with_authors and args.quick:
        parser.error("--with-authors: the authors' models are paper-scale; they cannot join a --quick study")
    out = args.out or results_folder(args.quick)
    if args.official:
        ckpt_dir = _official_folder(parser, args)
        out = args.out or Path("results") / "official"
    if args.seeds is not None:
        out = out / "seeds"
    check_writable(parser, out)
    return cfg, device, ckpt_dir, out
