"""The amplification map (theory.py --amplification): when does a layer's combination of heads beat its best head?
Section 3's worked argument; random head sets (graphs.FAMILIES) drawn at controlled sharing, with a sequential
stopping rule; the summary of a sample of head sets (share with its Wilson interval, gain, synergy); every trained
multi-head layer on the same axis; the findings in numbers.

    from amplification import amplification_map, trained_layers, place_on_map, conditions, worked_argument
    table = amplification_map(cfg, seed=42, spread=0.14)        # one row per family, n, head count and share level
    placed = place_on_map(trained_layers(loaded, cfg, cells), table)
    conditions(table, placed)                                    # the findings, one sentence each
"""
import contextlib
import functools
import itertools
import math
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pandas as pd
import torch

import proxies
from config import AUTHORS, SHARE_LEVELS
from evaluation import rows_per_task, head_diversity, head_set_values, wilson_interval
from graphs import FAMILIES, three_node_heads
from runs import load_runs

AMPLIFY_RTOL = 1e-9  # a gain below this share of the best head's value is float rounding (identical heads: ~1e-16)
HIGHER_IS_BETTER = {"fidelity": True, "learned_fidelity": True, "mixing_time": False, "epsilon_mixing_time": False}


def amplification_summary(values, diversity):
    """Over a sample of head sets (random draws, or one layer's sequences): for each proxy in `values` (as
    head_set_values gives them), the share where the combination beats its best head by more than AMPLIFY_RTOL
    (higher fidelity, fewer steps) with its Wilson 95% interval, the mean gain over the best head and, where the
    parallel heads are given, the mean synergy over them (both signed: positive = the combination helps); and the
    mean head diversity."""
    row = {"samples": int(np.size(diversity)), "diversity": float(np.mean(diversity))}
    for proxy, v in values.items():
        sign = 1 if HIGHER_IS_BETTER[proxy] else -1
        gain = sign * (v["combined"] - v["best_head"])
        wins = int((gain > AMPLIFY_RTOL * np.abs(v["best_head"])).sum())
        low, high = wilson_interval(wins, gain.size)
        row.update({f"{proxy}_best_head": float(np.mean(v["best_head"])),
                    f"{proxy}_combined": float(np.mean(v["combined"])), f"{proxy}_share": wins / gain.size,
                    f"{proxy}_share_low": low, f"{proxy}_share_high": high, f"{proxy}_gain": float(np.mean(gain))})
        if "parallel" in v:
            row[f"{proxy}_synergy"] = float(np.mean(sign * (v["combined"] - v["parallel"])))
    return row


def _layer_amplification(model, tokens, task, heads, cfg):
    """amplification_summary rows of a model's layers over its sequences (fidelity with its learned head weights,
    and with uniform weights beside), with the spread of its learned weights (std of their logarithm)."""
    with torch.no_grad():
        attn = model.attention(tokens).double()  # (S, L, H, T, T)
    weights = proxies.model_head_weights(model)  # (L, H)
    fidelity = proxies.head_set_fidelities(attn, weights, cfg.horizon)
    best = fidelity["heads"].max(-1)
    uniform = proxies.minimax_fidelity(attn, horizon=cfg.horizon)
    diversity = head_diversity(attn)
    rows = []
    for layer in range(attn.shape[1]):
        learned = {"combined": fidelity["combined"][:, layer], "parallel": fidelity["parallel"][:, layer],
                   "best_head": best[:, layer]}
        summary = amplification_summary({"fidelity": learned}, diversity[:, layer])
        check = amplification_summary({"fidelity": {"combined": uniform[:, layer], "best_head": best[:, layer]}},
                                      diversity[:, layer])
        rows.append({"task": task, "heads": heads, "layer": layer + 1, "n": attn.shape[-1], **summary,
                     "uniform_fidelity_share": check["fidelity_share"], "uniform_fidelity_gain": check["fidelity_gain"],
                     "weight_log_spread": float(np.log(weights[layer]).std())})  # how far from uniform
    return rows


def layer_amplification_rows(models, cfg, seed):
    """_layer_amplification rows of every (heads, task) model with more than one head, on its task's evaluation
    sequences for `seed` (those of the synergy study)."""
    return rows_per_task({key: model for key, model in models.items() if key[0] > 1}, cfg, seed,
                          lambda model, tokens, task, heads: _layer_amplification(model, tokens, task, heads, cfg))


# Section 3's worked argument
def worked_argument(betas, horizon):
    """u's fidelity phi_u in each head of three_node_heads and in their combination with weights (beta, 1 - beta),
    against the bound beta (1 - beta) / 4 of the cross term Delta_2 Delta_1 (the two-step path u -> v -> tau), and u's
    signal at the sink after those two steps, which the cross term alone makes."""
    heads = three_node_heads()
    alone = proxies.per_node_fidelity(heads[:, None], horizon=horizon)[:, 0]  # (2,): u in each head
    return pd.DataFrame([{"beta_1": beta, "phi_u_head_1": alone[0], "phi_u_head_2": alone[1],
                          "phi_u_combined": proxies.per_node_fidelity(heads, [beta, 1 - beta], horizon)[0],
                          "signal_u_step_2": proxies.sink_signal(heads, [beta, 1 - beta], horizon=2)[1, 0],
                          "cross_term_bound": beta * (1 - beta) / 4} for beta in betas])


# The map: random head sets, drawn cell by cell
DRAW_BATCHES = 8  # a cell's draws come in this many batches; it stops early once every share is known to +-3 points
HALF_WIDTH = 0.03
DRAW_CHUNK = 32  # draws evaluated together: 26 MB at n = 100, 8 heads, under glibc's 32 MB mmap ceiling, so memory
#                  is reused rather than faulted in afresh (docs/speed.md, "The amplification map")


def draw_generator(seed, family, n, heads, share):
    """The seeded generator of one cell of the map: its draws depend on the seed and the cell only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{family}/{n}/{heads}/{share}".encode()))


def draw_values(family, n, heads, share, cfg, *, generator, spread, size, device):
    """head_set_values of `size` draws under uniform weights (the epsilon-mixing time included), with the fidelity
    under learned-like weights beside (log-normal, `spread` the std of their logarithm), and head diversity. Drawn
    on the CPU (the same draws on every device), evaluated on `device`."""
    attn = FAMILIES[family](size, heads, n, share, generator).to(device)
    weights = torch.exp(spread * torch.randn(size, heads, generator=generator, dtype=torch.float64)).to(device)
    values, diversity = head_set_values(attn, None, cfg, epsilon_mixing=True)
    values["learned_fidelity"] = {"combined": proxies.minimax_fidelity(attn, weights, cfg.horizon),
                                  "best_head": values["fidelity"]["best_head"]}
    return values, diversity


def _joined(parts):
    """draw_values of several chunks as one."""
    values = {proxy: {k: np.concatenate([v[proxy][k] for v, _ in parts]) for k in parts[0][0][proxy]}
              for proxy in parts[0][0]}
    return values, np.concatenate([d for _, d in parts])


def _known(summary):
    """Every share's Wilson interval within HALF_WIDTH of its middle."""
    return all(summary[f"{proxy}_share_high"] - summary[f"{proxy}_share_low"] <= 2 * HALF_WIDTH
               for proxy in ("fidelity", "mixing_time", "epsilon_mixing_time", "learned_fidelity"))


def cell_values(family, n, heads, share, cfg, *, seed, spread, device="cpu"):
    """One cell of the map as an amplification_summary row: seeded draws (draw_values, DRAW_CHUNK at a time) in
    DRAW_BATCHES batches of cfg.amplification_draws in all, stopping after the batch at which every share is known
    to +-HALF_WIDTH."""
    generator, parts = draw_generator(seed, family, n, heads, share), []
    batch = math.ceil(cfg.amplification_draws / DRAW_BATCHES)
    for start in range(0, cfg.amplification_draws, batch):
        end = min(start + batch, cfg.amplification_draws)
        parts += [draw_values(family, n, heads, share, cfg, generator=generator, spread=spread, device=device,
                              size=min(DRAW_CHUNK, end - at)) for at in range(start, end, DRAW_CHUNK)]
        summary = amplification_summary(*_joined(parts))
        if _known(summary):
            return summary
    return summary


def _cell_row(cfg, seed, spread, device, cell):
    family, n, heads, share = cell
    return {"family": family, "n": n, "heads": heads, "share": share,
            **cell_values(family, n, heads, share, cfg, seed=seed, spread=spread, device=device)}


def amplification_map(cfg, seed, spread, *, device="cpu", pool=None):
    """cell_values of every family, size, head count and share level on `device`: here, or in the worker processes
    of `pool` (the cells are independent and seeded by themselves, so the numbers are the same)."""
    cells = list(itertools.product(FAMILIES, cfg.amplification_sizes, cfg.amplification_heads, SHARE_LEVELS))
    row_of = functools.partial(_cell_row, cfg, seed, spread, device)
    return pd.DataFrame(list((pool.map if pool else map)(row_of, cells)))


def worker_pool(jobs):
    """jobs worker processes of one thread each (most of the map's steps use one core only), or, for one job, none
    (the work runs here)."""
    if jobs <= 1:
        return contextlib.nullcontext()
    return ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                               initargs=(1,))


# The trained layers on the map, and the findings
def _run_rows(cfg, run, models):
    return [{"run": run.name, **row} for row in layer_amplification_rows(models, cfg, run.seed)]


def _run_rows_loaded_here(cfg, cells, run):
    """_run_rows of one run, its models read from its checkpoints in this (worker) process."""
    (_, models), = load_runs(cfg, cells, [run], torch.device("cpu"), log=lambda line: None)
    return _run_rows(cfg, run, models)


def trained_layers(loaded, cfg, cells, pool=None):
    """layer_amplification_rows of every run's models, with a run column: here, or a run per task in `pool`."""
    if pool is None:
        rows = [_run_rows(cfg, run, models) for run, models in loaded]
    else:
        rows = pool.map(functools.partial(_run_rows_loaded_here, cfg, cells), [run for run, _ in loaded])
    return pd.DataFrame([row for part in rows for row in part])


def place_on_map(trained, table):
    """Each trained layer's random counterpart: the share of random draws that amplify at its diversity, per family,
    interpolated along the curve of the same head count at n = the trained sequence length (NaN where no such curve
    or outside its range of diversity)."""
    placed = trained.copy()
    for family in FAMILIES:
        def at(layer):
            curve = table[(table.family == family) & (table.heads == layer.heads) & (table.n == layer.n)]
            curve = curve.sort_values("diversity")
            inside = len(curve) and curve.diversity.min() <= layer.diversity <= curve.diversity.max()
            return float(np.interp(layer.diversity, curve.diversity, curve.fidelity_share)) if inside else math.nan
        placed[f"random_{family}_share"] = [at(layer) for layer in placed.itertuples()]
    return placed


def _first_crossing(x, y, level):
    """The x at which y first reaches `level`, linearly interpolated between the points around it; NaN if never."""
    above = np.flatnonzero(y >= level)
    if not len(above):
        return math.nan
    k = above[0]
    return float(x[0]) if k == 0 else float(np.interp(level, y[k - 1:k + 1], x[k - 1:k + 1]))


def _per_run(placed, family):
    """The median difference to the random heads of `family`, run by run: in how many of our runs it is positive,
    its range, and the authors' where present."""
    there = placed.dropna(subset=[f"random_{family}_share"])
    medians = (there.fidelity_share - there[f"random_{family}_share"]).groupby(there.run, sort=False).median()
    ours, theirs = medians.drop(AUTHORS, errors="ignore"), medians.get(AUTHORS)
    return (f"; run by run, positive in {int((ours > 0).sum())} of {len(ours)} runs ({100 * ours.min():+.1f} to "
            f"{100 * ours.max():+.1f})" + ("" if theirs is None else f", the authors' {100 * theirs:+.1f}"))


def conditions(table, placed):
    """The map's findings in numbers, one sentence each: per family and head count at the largest n, the share of
    amplifying draws from identical to independent heads and the diversity at which it passes one half; then where
    the trained layers sit against the random heads of the same diversity."""
    lines, n = [], table.n.max()
    for (family, heads), curve in table[table.n == n].groupby(["family", "heads"], sort=False):
        curve = curve.sort_values("diversity")
        half = _first_crossing(curve.diversity.to_numpy(), curve.fidelity_share.to_numpy(), 0.5)
        lines.append(f"{family} heads, n = {n}, {heads} heads: the combination beats its best head in "
                     f"{100 * curve.fidelity_share.iloc[0]:.1f}% of draws at diversity {curve.diversity.iloc[0]:.2f} "
                     f"(identical heads) and {100 * curve.fidelity_share.iloc[-1]:.1f}% at "
                     f"{curve.diversity.iloc[-1]:.2f} (nothing shared); "
                     + (f"in half of them from diversity {half:.2f} on" if half == half else
                        "never in half of them along the way"))
    diverse = table[table.share < 1]
    for proxy, name in (("mixing_time", "the paper's mixing time"), ("epsilon_mixing_time", "the ε-mixing time")):
        top = diverse.loc[diverse[f"{proxy}_share"].idxmax()]
        lines.append(f"{name}: the combination mixes faster than its fastest head in at most "
                     f"{100 * top[f'{proxy}_share']:.1f}% of a cell's draws ({top.family}, n = {top.n}, "
                     f"{top.heads} heads, share {top.share}); its mean gain over the fastest head is negative in "
                     f"{int((diverse[f'{proxy}_gain'] < 0).sum())} of {len(diverse)} cells with heads not identical")
    lines.append(f"synergy over the same heads in parallel: positive in {int((diverse.fidelity_synergy > 0).sum())} of "
                 f"{len(diverse)} such cells, at most {diverse.fidelity_synergy.max():.3f} percentage points; "
                 f"learned-like weights move the share of amplifying draws by at most "
                 f"{100 * (diverse.learned_fidelity_share - diverse.fidelity_share).abs().max():.1f} points")
    ours = placed[placed.run != AUTHORS]
    for family in FAMILIES:
        there = ours.dropna(subset=[f"random_{family}_share"])
        difference = there.fidelity_share - there[f"random_{family}_share"]
        lines.append(f"trained layers ({len(ours)} layers of our runs, diversity {ours.diversity.min():.2f}–"
                     f"{ours.diversity.max():.2f}; median share of sequences that amplify "
                     f"{100 * ours.fidelity_share.median():.0f}%): against random {family} heads of the same head "
                     f"count, n and diversity ({len(there)} layers with such a curve), {int((difference < 0).sum())} "
                     f"amplify less often, {int((difference > 0).sum())} more often; median difference "
                     f"{100 * difference.median():+.1f} points" + _per_run(placed, family))
    return lines
