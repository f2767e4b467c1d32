"""What the scripts share: their command-line flags, the training runs they read (--seeds), and how they write
results (atomically, CSV + Markdown tables, PNG + PDF figures, summaries across runs).

    from script_io import add_common_args, resolve_common, save_table, save_figure, write_atomic
    from script_io import fetch_official   # the authors' 8 released checkpoints, verified, into the user's cache
    from script_io import runs_of, across_runs   # --seeds: every training run, and their mean, std and t-interval
"""
import contextlib
import dataclasses
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.hub
from scipy import stats

from config import CKPT_DIR, PAPER, QUICK, SEED, TASKS, cache_dir

# The authors' released checkpoints: their repository at a pinned commit, and each file's SHA-256.
OFFICIAL_REPO, OFFICIAL_COMMIT = "haitzsaezdeocariz/beyondparallelism", "0de5787e624f2cc4b274c87b93a6f6d662dee9ad"
OFFICIAL_URL = f"https://raw.githubusercontent.com/{OFFICIAL_REPO}/{OFFICIAL_COMMIT}/checkpoints"
OFFICIAL_URL_VARIABLE = "BEYONDPARALLELISM_OFFICIAL_URL"  # replaces OFFICIAL_URL: mirrors, tests
OFFICIAL_SHA256 = {
    "1_heads_copy.pt": "301a874b10ac7e8381458f738be2748928ff67d5b69dad677d9ce47a8bc12904",
    "4_heads_copy.pt": "ded0999c457ca3605b79bded66e271623765f2b8d55841306912e6143a74cf2b",
    "8_heads_copy.pt": "d2bca84e1e59778a9b13775fab745821ef1bafc053e51bef3f3a37bb4ab6f093",
    "16_heads_copy.pt": "0de2dfa01e1a263c25e1ed28ffc6d298b86129d05b9984ff12115cd2ae5ca22c",
    "1_heads_cycle.pt": "6bf97d1c26f8c13bfdd0ea4aafbe017c806ce49ad67c9d781bb6794d452f4fd1",
    "4_heads_cycle.pt": "882680ba5e12377641482c1a82d40026e357f46eacc697e057ee530910e6a333",
    "8_heads_cycle.pt": "96ab0694ee8b1d3439423d74ea8cddfe26e8af89ad8fb51bd99d1137eee63b06",
    "16_heads_cycle.pt": "733be35e05143fac18a8c998466d85fc6730c5aef83f75a8c565a8607bfc84a2",
}


@contextlib.contextmanager
def input_errors(parser):
    """Bad input met while running (a truncated or foreign checkpoint, a file that cannot be written) as one line on
    stderr, `prog: error: ...`, exit status 2, no traceback."""
    try:
        yield
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


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
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per cell (default: the CPU's cores shared among the cells that train "
                             "at once; a cell's CPU arithmetic depends on it, and it is recorded)")
    parser.add_argument("--group", choices=("yes", "no"), default="no",
                        help="yes: train the cells of each head count together, all in every step "
                             "(train.train_group; slower on a CPU, unmeasured at paper scale on a GPU). no (default): "
                             "one cell per worker process, the measured path on both")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="stop training before MINUTES have passed, saving resume states of unfinished cells")


def add_evaluation_args(parser, heads):
    """The flags of the scripts that evaluate the (heads, task) models: --heads (default `heads`), --tasks, the
    training flags (for missing checkpoints), the common flags, --out and --official."""
    parser.add_argument("--heads", type=int, nargs="+", default=list(heads), help=f"head counts (default {heads})")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                        help="evaluate every training run instead of one: seed --seed's checkpoints in CKPT_DIR, "
                             "seed S's in CKPT_DIR/seeds/seed_S, and the authors' released models where present "
                             "(shown beside ours, never pooled); trains nothing; writes OUT/seeds/")
    add_training_args(parser)
    add_common_args(parser, out_help="output folder (default results; results/quick with --quick, "
                                     "results/official with --official)", official=True)


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


def resolve_common(parser, args, default_out=None):
    """(config, device, ckpt_dir, out) from the common flags, each checked (a usage error names the bad flag);
    --quick changes the defaults, not explicit paths."""
    cfg = QUICK if args.quick else PAPER
    if getattr(args, "epochs", None) is not None:
        if args.epochs < 1:
            parser.error(f"--epochs must be at least 1, got {args.epochs}")
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    heads = getattr(args, "heads", None)
    for h in [heads] if isinstance(heads, int) else heads or []:
        if h < 1 or cfg.embed_dim % h:
            parser.error(f"--heads: a head count must divide embed_dim={cfg.embed_dim}, got {h}")
    if isinstance(getattr(args, "group", None), str):
        args.group = args.group == "yes"
    for flag in ("jobs", "threads"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if getattr(args, "time_budget", None) is not None and args.time_budget <= 0:
        parser.error(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    ckpt_dir = args.ckpt_dir or (CKPT_DIR / "quick" if args.quick else CKPT_DIR)
    out = getattr(args, "out", None) or (default_out and (Path("results/quick") if args.quick else Path(default_out)))
    if default_out and getattr(args, "seeds", None) is not None:  # the evaluation scripts' --seeds
        clash = [flag for flag, given in (("--official", getattr(args, "official", False)),
                                          ("--retrain", getattr(args, "retrain", False))) if given]
        if clash:
            parser.error(f"--seeds evaluates the checkpoints that exist (the authors' among them); it cannot be "
                         f"combined with {', '.join(clash)}")
        repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1} | ({args.seed} & set(args.seeds)))
        if repeated:
            parser.error(f"--seeds: each training run once, and not --seed ({args.seed}, read from CKPT_DIR itself); "
                         f"repeated: {' '.join(map(str, repeated))}")
    if getattr(args, "official", False):
        clash = [flag for flag, given in (("--ckpt-dir", args.ckpt_dir), ("--quick", args.quick),
                                          ("--retrain", getattr(args, "retrain", False))) if given]
        if clash:
            parser.error(f"--official evaluates the authors' paper-scale checkpoints; it cannot be combined with "
                         f"{', '.join(clash)}")
        try:
            ckpt_dir = fetch_official()
        except RuntimeError as error:
            parser.exit(1, f"{parser.prog}: error: {error}\n")
        out = getattr(args, "out", None) or (default_out and Path(default_out) / "official")
    if default_out and getattr(args, "seeds", None) is not None:
        out = out / "seeds"
    if out:
        check_writable(parser, out)
    return cfg, device, ckpt_dir, out


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of every cell: its name in the tables, its seed (the evaluation protocol's too) and folder."""
    name: str
    seed: int
    folder: Path


AUTHORS = "authors"  # the run name of the authors' released models: shown beside ours, never pooled with them
SHARED_OFFICIAL = Path(__file__).resolve().parent.parent / "shared" / "official_checkpoints"  # a workplace's copy


def authors_folder():
    """A folder holding the authors' 8 released checkpoints, each checked against its SHA-256, without fetching:
    the --official cache, else ../shared/official_checkpoints; None when neither holds all 8."""
    for folder in (official_cache_dir(), SHARED_OFFICIAL):
        if all((folder / name).is_file() and sha256_of(folder / name) == sha for name, sha in OFFICIAL_SHA256.items()):
            return folder
    return None


def runs_of(args, ckpt_dir, quick=False):
    """The runs --seeds names: seed --seed's in ckpt_dir, seed S's in ckpt_dir/seeds/seed_S, then the authors' where
    present (not with --quick: they are paper-scale). The authors' seed is the paper's, 42, as in their code."""
    runs = [Run(str(args.seed), args.seed, Path(ckpt_dir))]
    runs += [Run(str(s), s, Path(ckpt_dir) / "seeds" / f"seed_{s}") for s in args.seeds]
    folder = None if quick else authors_folder()
    return runs + ([Run(AUTHORS, SEED, folder)] if folder else [])


def across_runs(per_run, keys, values, name="quantity"):
    """Across our runs (the authors' left out, shown in their own column): for each group of `keys` and each
    values[label] column, n_runs, the runs, mean, std (ddof 1), Student-t 95% interval of the mean, min and max."""
    ours, theirs = per_run[per_run.run != AUTHORS], per_run[per_run.run == AUTHORS].set_index(keys)
    rows = []
    for key, part in ours.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for label, column in values.items():
            x = part[column].to_numpy(dtype=float)
            n, mean = len(x), float(x.mean())
            std = float(x.std(ddof=1)) if n > 1 else float("nan")
            half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
            authors = theirs[column].get(key if len(key) > 1 else key[0], float("nan")) if len(theirs) else float("nan")
            rows.append({**dict(zip(keys, key)), name: label, "n_runs": n, "runs": " ".join(part.run.astype(str)),
                         "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
                         "min": float(x.min()), "max": float(x.max()), "authors": float(authors)})
    return pd.DataFrame(rows)


def across_runs_view(table, digits=2):
    """The Markdown view of an across_runs table: mean ± std [95% interval] (min–max), n and the authors' value."""
    f = lambda x: "–" if pd.isna(x) else f"{x:.{digits}f}"
    view = table.drop(columns=["runs", "mean", "std", "ci_low", "ci_high", "min", "max", "authors"]).copy()
    view["mean ± std [95% t-interval]"] = [f"{f(m)} ± {f(s)} [{f(lo)}, {f(hi)}]" for m, s, lo, hi in
                                          zip(table["mean"], table["std"], table.ci_low, table.ci_high)]
    view["min – max"] = [f"{f(lo)} – {f(hi)}" for lo, hi in zip(table["min"], table["max"])]
    view["authors'"] = table.authors.map(f)
    return view


def deadline_of(minutes):
    """--time-budget MINUTES counted from now, as an absolute time.time(); None for no budget."""
    return None if minutes is None else time.time() + 60 * minutes


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def official_cache_dir():
    """Where --official keeps the authors' checkpoints."""
    return cache_dir() / "official" / OFFICIAL_COMMIT[:12]


def fetch_official(progress=True, log=print):
    """The authors' 8 released checkpoints in the user's cache, each checked against its pinned SHA-256; a verified
    cached file is not fetched again. Returns the cache folder, usable as --ckpt-dir."""
    base = os.environ.get(OFFICIAL_URL_VARIABLE) or OFFICIAL_URL
    folder = official_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name, expected in OFFICIAL_SHA256.items():
        path = folder / name
        if path.is_file() and sha256_of(path) == expected:
            continue
        url = f"{base.rstrip('/')}/{name}"
        log(f"fetching {url}")
        unverified = path.with_name(f".{name}.unverified")
        try:  # torch.hub writes to a temporary file of its own and moves it into place when complete
            torch.hub.download_url_to_file(url, str(unverified), progress=progress)
        except Exception as error:
            raise RuntimeError(f"could not fetch {url}: {type(error).__name__}: {error}. Offline, or behind a "
                               f"firewall? Copy the authors' {{H}}_heads_{{task}}.pt files into a folder and pass "
                               f"--ckpt-dir FOLDER instead of --official") from error
        found = sha256_of(unverified)
        if found != expected:
            unverified.unlink()
            raise RuntimeError(f"{name} from {url} failed its checksum: expected SHA-256 {expected}, found {found}; "
                               f"the file was not kept")
        os.replace(unverified, path)
    return folder
