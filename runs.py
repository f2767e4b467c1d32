"""Training runs: the runs that --seeds names, their models (load_runs: read and checked, nothing trained), their
per-run tables summarised across runs, the one --seeds study routine the evaluation scripts share, and where the
training of a run's cells stands (training_status, for train.py --status).

    from runs import runs_of, evaluate_runs, write_study
    runs = runs_of(seed=42, seeds=[0, 1], ckpt_dir=Path("checkpoints"), authors=None)  # 42 in checkpoints/, S in
                                                   # seeds/seed_S/, then the authors' when their folder is given
    per_run = evaluate_runs(cfg, cells, runs, device, rows_of)           # rows_of(models, seed) -> rows, per run
    write_study(per_run, out, stem="section4", keys=[...], values={...}, name="proxy", view=markdown_view)
    rows, summary, hours_left = training_status(cfg, cells, "cpu", jobs=2)

Across runs: per group, the mean over our runs with its std (ddof 1) and Student-t 95% interval, min and max; the
authors' value beside it, never pooled.
"""
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from checkpoints import Cell, load_model, read_checkpoint, seed_folder
from claims import write_claims
from config import AUTHORS, SEED
from script_io import save_figure, save_table


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of every cell: its name in the tables, its seed (the evaluation protocol's too) and folder."""
    name: str
    seed: int
    folder: Path


def runs_of(seed, seeds, ckpt_dir, authors=None):
    """The runs of --seed and --seeds: seed's in ckpt_dir, seed S's in ckpt_dir/seeds/seed_S, then the authors' when
    `authors` (their checkpoints' folder, from --with-authors) is given. The authors' seed is the paper's, 42, as in
    their code."""
    runs = [Run(str(seed), seed, Path(ckpt_dir))]
    runs += [Run(str(s), s, seed_folder(ckpt_dir, s)) for s in seeds]
    return runs + ([Run(AUTHORS, SEED, Path(authors))] if authors else [])


def load_runs(cfg, cells, runs, device, log=print):
    """Each run's models among `cells` (a list of (heads, task)), every checkpoint read and checked; nothing is
    trained, and the missing cells are named. Returns [(run, {(heads, task): model})] for runs with any cell."""
    loaded, missing = [], []
    for run in runs:
        models = {}
        for heads, task in cells:
            cell = Cell(heads, task, run.seed, run.folder)
            if cell.path.is_file():
                models[heads, task] = load_model(cfg, heads, cell.path, device)[0]
            else:
                unfinished = " (unfinished: resume state present)" if cell.resume_path.is_file() else ""
                missing.append(f"{cell.path}{unfinished}")
        if models:
            loaded.append((run, models))
    complete = [run.name for run, models in loaded if len(models) == len(cells)]
    log(f"runs: {len(loaded)} with checkpoints ({', '.join(run.name for run, _ in loaded) or 'none'}), complete: "
        f"{', '.join(complete) or 'none'}" + (f"; {len(missing)} cell(s) missing, left out: " + "; ".join(missing)
                                               if missing else ""))
    return loaded


def evaluate_runs(cfg, cells, runs, device, rows_of):
    """Every run's present cells through rows_of(models, seed) -> rows: one table with a `run` column; or, where
    rows_of gives {name: rows} (several tables from one pass), {name: table}. ValueError when no run has any of the
    cells."""
    loaded = load_runs(cfg, cells, runs, device)
    if not loaded:
        raise ValueError(f"no checkpoint of {', '.join(f'{h}_heads_{t}' for h, t in cells)} in {runs[0].folder} or "
                         f"{runs[0].folder}/seeds/seed_S for any S of --seeds")
    tables = {}
    for run, models in loaded:
        out = rows_of(models, run.seed)
        for name, rows in (out.items() if isinstance(out, dict) else [(None, out)]):
            tables.setdefault(name, []).extend({"run": run.name, **row} for row in rows)
    return pd.DataFrame(tables[None]) if None in tables else {name: pd.DataFrame(r) for name, r in tables.items()}


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
            with np.errstate(invalid="ignore"):  # a walk that never mixed: inf, whose spread is NaN
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


def write_study(per_run, out, *, stem, keys, values, name, view, digits=2, plot=None):
    """One script's --seeds study from its per-run table: OUT/{stem}_runs.{csv,md} (view(per_run) in Markdown),
    OUT/{stem}_across_runs.{csv,md}, OUT/{stem}_runs.{png,pdf} when `plot(per_run, across)` is given, and the
    claims over every per-run table in `out`. Returns the claims table."""
    across = across_runs(per_run, keys, values, name=name)
    save_table(per_run, out / f"{stem}_runs", view=view(per_run))
    save_table(across, out / f"{stem}_across_runs", view=across_runs_view(across, digits=digits))
    if plot is not None:
        save_figure(plot(per_run, across), out / f"{stem}_runs")
    return write_claims(out)


# Where the training of a run's cells stands (train.py --status)
def _cell_files(cfg, cell):
    """(state, epochs trained, sessions) of a cell, read from its checkpoint or resume state."""
    if cell.path.is_file():
        facts = read_checkpoint(cell.path).get("training", {})
        return "finished", facts.get("epochs", cfg.epochs), facts.get("sessions", [])
    if cell.resume_path.is_file():
        state = read_checkpoint(cell.resume_path)
        return f"epoch {state['epoch']}/{cfg.epochs}", state["epoch"], state.get("sessions", [])
    return "not started", 0, []


def training_status(cfg, cells, device_type, jobs):
    """Where the training of the Cells stands, read from their files.

    Returns one row per cell (finished, stopped after epoch k, or not started; the hours it took and on what), a
    summary line, and the cell-hours left: each unfinished cell's epochs times the seconds per epoch that these
    cells' own sessions on `device_type` took at its head count (a grouped session's time shared among its cells;
    nan where no session measured that head count)."""
    rows, spent = [], {}
    for cell in cells:
        state, epochs, sessions = _cell_files(cfg, cell)
        cell_seconds = [s["seconds"] / s.get("group", 1) for s in sessions]
        for s, seconds in zip(sessions, cell_seconds):
            if torch.device(s["device"]).type == device_type:
                total = spent.setdefault(cell.heads, [0.0, 0])
                total[0] += seconds
                total[1] += s["last_epoch"] - s["first_epoch"] + 1
        rows.append(dict(seed=cell.seed, heads=cell.heads, task=cell.task, state=state, epochs=epochs,
                         hours=round(sum(cell_seconds) / 3600, 2),
                         on=", ".join(dict.fromkeys(f"{s['hardware']} ({s['device']}"
                                                    + (f", {s['threads']} thread(s))" if s["device"] == "cpu" else ")")
                                                    for s in sessions))))
    per_epoch = {h: seconds / epochs for h, (seconds, epochs) in sorted(spent.items()) if epochs}
    left = [r for r in rows if r["state"] != "finished"]
    hours_left = sum((cfg.epochs - r["epochs"]) * per_epoch.get(r["heads"], float("nan")) for r in left) / 3600
    summary = (f"{len(rows) - len(left)} of {len(rows)} cells finished, {sum(r['epochs'] > 0 for r in left)} "
               f"unfinished, {sum(r['epochs'] == 0 for r in left)} not started; "
               f"{sum(r['hours'] for r in rows):.1f} cell-hours spent. ")
    if not left:
        return rows, summary + "Nothing left.", hours_left
    return rows, summary + (
        f"Left: about {hours_left:.1f} cell-hours on {device_type}, {hours_left / jobs:.1f} h with {jobs} at a time, "
        f"at the seconds per epoch these cells took on {device_type} ("
        + (", ".join(f"{h} heads {t:.1f} s" for h, t in per_epoch.items()) or "none measured") + ")"), hours_left
