"""The paper's theory put to the test: Theorem 2.9 on every trained layer, mixing across sequence length,
Vitvitskyi et al.'s graph families, and the map of when combining heads amplifies fidelity (Section 3).

    python theory.py --graphs           # results/theory/graphs.{csv,md}: line, fully connected and Poisson graphs
    python theory.py                    # seed 42's models: results/theory/theorem29.*, prefix.*, growth.*
    python theory.py --seeds 0 1 2 3 4  # every run: results/seeds/theorem29_runs.*, prefix_runs.*, claims.*
    python theory.py --official         # the authors' models: results/official/theory/
    python theory.py --amplification    # results/theory/amplification.*: random heads, every trained layer on them

Theorem 2.9 (from summaries of the paper): the layer's walk W = sum_h w_h W_h (each head's attention column-
normalised into a walk toward the sink) mixes within 2N/p steps, N = n - 1, p = sum_h w_h p_h, p_h the head's
probability of stepping toward the sink. We take p_h at the head's worst node, which makes the bound rigorous when
N p > ln(2 / epsilon) (docs/theory.md derives it), and report the mean node's beside it. The mixing time is
Vitvitskyi et al.'s averaged epsilon-mixing time (epsilon = 1/4, their published convention); the bound is checked
against the worst start. The prefix study reads each trained layer on its first n tokens (under a causal mask, the
top-left n x n block of its attention) and asks whether its mixing time grows like log n or like n. Files and
flags as the other scripts; the evaluation itself is evaluation.theory_rows.

--amplification: Section 3's worked argument (three_node_heads); random head sets of two families, sparse DAGs and
dense softmax attention, whose heads share a controlled part (config.SHARE_LEVELS: identical to independent), per
size and head count of the config; per cell, the share of draws where the combination beats its best head (Wilson
95% interval), the mean gain and the synergy over the heads in parallel, for fidelity, the paper's mixing time and
the epsilon-mixing time; and every trained multi-head layer of our runs (and the authors' where present) on the
same diversity axis (evaluation.layer_amplification_rows). docs/theory.md says what the map finds.
"""
import argparse
import contextlib
import functools
import itertools
import math
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np
import pandas as pd
import torch

import proxies
from claims import claims_markdown, growth_fit
from config import (AUTHORS, DENSE_TEMPERATURE, GRAPH_SIZES, HEADS, POISSON_DRAWS, POISSON_P, QUICK_GRAPH_SIZE, SEEDS,
                    SHARE_LEVELS)
from evaluation import amplification_summary, head_set_values, layer_amplification_rows, theory_rows
from runs import evaluate_runs, load_runs, runs_of, write_study
from script_io import (add_evaluation_args, input_errors, resolve_evaluation, save_figure, save_table, write_atomic,
                       write_text)
from train import models_of

THEOREM29_ACROSS = {"mixing": "mixing", "mixing_worst": "mixing_worst", "fastest_head": "fastest_head",
                    "bound": "bound", "bound_holds_share": "bound_holds_share"}
PREFIX_ACROSS = {"mixing": "mixing", "bound": "bound", "mixing_time": "mixing_time", "fidelity": "fidelity"}


# Vitvitskyi et al.'s graph families, as adjacency a[i, j] = 1 iff (j, i) is an edge (j <= i), self-loops included
def line_graph(n):
    """Edges (b - 1, b) and self-loops."""
    return torch.eye(n, dtype=torch.float64) + torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)


def fully_connected_graph(n):
    """Every edge (a, b) with a <= b."""
    return torch.ones(n, n, dtype=torch.float64).tril()


def poisson_graph(n, p, generator):
    """Our reading of their Poisson(p) construction (their text gives no in-degree budget): the line graph, and for
    each node b a further K_b ~ Poisson(p (b - 1)) in-edges from distinct nodes among 0..b-2 drawn uniformly, K_b
    capped at the b - 1 nodes there are: in expectation each earlier, non-adjacent node is joined with probability
    about p. The line edges keep every node on a path to the sink."""
    b = torch.arange(n, dtype=torch.float64)
    budget = torch.poisson(p * (b - 1).clamp(min=0), generator=generator)
    scores = torch.rand(n, n, generator=generator, dtype=torch.float64)
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-2)  # a <= b - 2
    rank = scores.masked_fill(~earlier, 2.0).argsort(-1).argsort(-1)  # each node's earlier nodes in a random order
    # the first budget of them: at most the b - 1 there are, so the cap needs no code
    return line_graph(n) + ((rank < budget[:, None]) & earlier).double()


def graph_values(adjacency):
    """Averaged and worst-start epsilon-mixing time, normalised fidelity n min_i phi_i (phi converged: see
    proxies.converged_minimax_fidelity) and the step at which its value became certain."""
    times = proxies.epsilon_mixing_times(proxies.graph_walk(adjacency))
    fidelity, horizon = proxies.converged_minimax_fidelity(proxies.graph_diffusion(adjacency))
    return {"mixing_time": times["average"], "mixing_time_worst": times["worst"],
            "normalised_fidelity": len(adjacency) * fidelity, "fidelity_horizon": horizon}


def graph_rows(max_size, seed):
    """One row per family and size: the line and fully connected graphs, and the mean (and std) over POISSON_DRAWS
    seeded Poisson draws."""
    rows = []
    for family, sizes in GRAPH_SIZES.items():
        for n in (n for n in sizes if n <= max_size):
            if family == "poisson":
                generator = torch.Generator().manual_seed(seed * 100_003 + n)
                draws = pd.DataFrame([graph_values(poisson_graph(n, POISSON_P, generator))
                                      for _ in range(POISSON_DRAWS)])
                rows.append({"graph": f"poisson({POISSON_P})", "n": n, "draws": POISSON_DRAWS, **draws.mean(),
                             "mixing_time_std": draws.mixing_time.std(),
                             "normalised_fidelity_std": draws.normalised_fidelity.std()})
            else:
                adjacency = line_graph(n) if family == "line" else fully_connected_graph(n)
                rows.append({"graph": family, "n": n, "draws": 1, **graph_values(adjacency)})
    return pd.DataFrame(rows)


def reference_graphs(lengths):
    """Averaged epsilon-mixing time of the line and fully connected graphs at the prefix lengths, for the figure."""
    return {name: [proxies.epsilon_mixing_time(proxies.graph_walk(make(n))) for n in lengths]
            for name, make in (("line graph", line_graph), ("fully connected", fully_connected_graph))}


def growth_table(prefix):
    """Per (run where present), task, head count and layer: how the layer's mixing time grows with n."""
    keys = [k for k in ("run", "task", "heads", "layer") if k in prefix.columns]
    rows = []
    for key, part in prefix.groupby(keys, sort=False):
        r2_log, r2_linear, growth = growth_fit(part.n, part.mixing)
        rows.append({**dict(zip(keys, key)), "r2_log": r2_log, "r2_linear": r2_linear, "growth": growth})
    return pd.DataFrame(rows)


def plot_prefix(prefix, references):
    """Averaged epsilon-mixing time against n, one panel per task and layer, a line per head count; the line and
    fully connected graphs of the same n beside (grey)."""
    tasks, layers = list(dict.fromkeys(prefix.task)), sorted(set(prefix.layer))
    fig, axes = plt.subplots(len(tasks), len(layers), figsize=(3.2 * len(layers), 3.0 * len(tasks)), sharex=True,
                             sharey=True, squeeze=False)
    lengths = sorted(set(prefix.n))
    for row, task in enumerate(tasks):
        for col, layer in enumerate(layers):
            ax = axes[row, col]
            for (name, values), style in zip(references.items(), ("--", ":")):
                ax.plot(lengths, values, style, color="grey", label=name)
            unmixed = []
            for k, (heads, part) in enumerate(prefix[(prefix.task == task) & (prefix.layer == layer)].groupby("heads")):
                finite = part[np.isfinite(part.mixing)]
                ax.plot(finite.n, finite.mixing, "o-", ms=3, color=f"C{k}", label=f"{heads} head{'s' * (heads > 1)}")
                unmixed += [f"{heads} head{'s' * (heads > 1)}"] if len(finite) < len(part) else []
            if unmixed:  # a walk that never mixed within the cap: inf, not drawn
                ax.text(0.03, 0.95, f"not mixed at some n: {', '.join(unmixed)}", transform=ax.transAxes,
                        fontsize=7, va="top")
            ax.set(xscale="log", yscale="log", title=f"{task}, layer {layer}")
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_xlabel("sequence length n" if row == len(tasks) - 1 else "")
            ax.set_ylabel("ε-mixing time (steps)" if col == 0 else "")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_prefix_across_runs(across, lengths):
    """plot_prefix of the mean over our runs."""
    mixing = across[across.quantity == "mixing"].rename(columns={"mean": "mixing"})
    return plot_prefix(mixing, reference_graphs(lengths))


def table_view(table):
    """The Markdown view of a theory table: floats to 3 significant digits (the bounds span 1e2 to 1e29)."""
    view = table.copy()
    for column in view.columns:
        if view[column].dtype == float:
            view[column] = view[column].map(lambda x: f"{x:.3g}")
    return view


def write_one_run(models, cfg, args, out):
    """The one-run study of --seed's (or the authors') models: theorem29, prefix and growth tables, the figure."""
    began = time.perf_counter()
    tables = theory_rows(models, cfg, args.seed)
    theorem, prefix = pd.DataFrame(tables["theorem29"]), pd.DataFrame(tables["prefix"])
    growth = growth_table(prefix)
    print(f"evaluation: {time.perf_counter() - began:.1f} s")
    for r in theorem.itertuples():
        print(f"{r.task} {r.heads:2d} heads layer {r.layer}: T_mix {r.mixing:.3g} (worst start {r.mixing_worst:.3g}, "
              f"fastest head {r.fastest_head:.3g}) <= 2N/p = {r.bound:.3g} in {100 * r.bound_holds_share:.0f}% of "
              f"sequences; grows like {growth.growth[r.Index]}")
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("theorem29", theorem), ("prefix", prefix), ("growth", growth)):
        save_table(table, out / name, view=table_view(table))
    save_figure(plot_prefix(prefix, reference_graphs(cfg.prefix_lengths)), out / "prefix")
    print(f"wrote {out}/theorem29.*, prefix.*, growth.*")


def write_runs(parser, cfg, cells, args, *, ckpt_dir, device, out):
    """--seeds: every run's theorem29 and prefix rows, across runs, and the claims over every per-run table."""
    runs = runs_of(args.seed, args.seeds, ckpt_dir, args.quick)
    with input_errors(parser):
        tables = evaluate_runs(cfg, cells, runs, device, lambda models, seed: theory_rows(models, cfg, seed))
    keys = ["task", "heads", "layer"]
    write_study(tables["theorem29"], out, stem="theorem29", keys=keys, values=THEOREM29_ACROSS, name="quantity",
                view=table_view, digits=3)
    claims = write_study(tables["prefix"], out, stem="prefix", keys=keys + ["n"], values=PREFIX_ACROSS,
                         name="quantity", view=table_view, digits=3,
                         plot=lambda per_run, across: plot_prefix_across_runs(across, cfg.prefix_lengths))
    growth = growth_table(tables["prefix"])
    save_table(growth, out / "growth_runs", view=table_view(growth))
    print(claims_markdown(claims).split("\n\n|")[0])
    print(f"wrote {out}/theorem29_runs.*, theorem29_across_runs.*, prefix_runs.*, prefix_across_runs.*, "
          f"growth_runs.*, claims.*")


# --amplification: Section 3's worked argument, random head sets at a controlled sharing, and the trained layers
def three_node_heads():
    """Section 3's worked argument on nodes u, v, tau: head 1 has the edge u -> v, head 2 the edge v -> tau; self-loops
    and in-degree normalisation (proxies.graph_diffusion). (2, 3, 3)."""
    adjacency = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    adjacency[0, 1, 0] = 1  # head 1: u -> v (a[i, j] = 1 iff (j, i) is an edge)
    adjacency[1, 2, 1] = 1  # head 2: v -> tau
    return proxies.graph_diffusion(adjacency)


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


def sparse_heads(draws, heads, n, share, generator):
    """Sparse random causal DAGs: the line graph with self-loops, and each further edge (a, b), a <= b - 2, with
    probability POISSON_P (the Bernoulli form of poisson_graph's in-edges); each edge slot is common to all heads
    of a draw with probability `share`, else drawn for each head. In-degree normalised: (draws, heads, n, n)."""
    common = torch.rand(draws, 1, n, n, generator=generator)  # float32 coins: 4x faster to draw, exact enough
    own_edges = torch.rand(draws, heads, n, n, generator=generator) < POISSON_P
    # a common slot (common < share) holds an edge when common / share < POISSON_P: one uniform decides both
    further = torch.where(common < share, common < share * POISSON_P, own_edges)
    return proxies.graph_diffusion(line_graph(n) + (further & torch.ones(n, n, dtype=torch.bool).tril(-2)).double())


def dense_heads(draws, heads, n, share, generator):
    """Dense random causal attention: softmax over the causal mask of scores (sqrt(share) z + sqrt(1 - share) z_h)
    / DENSE_TEMPERATURE, z common to the heads of a draw and z_h each head's own, all standard normal (so each head's
    scores have the same law at every share). (draws, heads, n, n), float64."""
    common = torch.randn(draws, 1, n, n, generator=generator)  # float32 normals: 4x faster to draw
    own = torch.randn(draws, heads, n, n, generator=generator)
    scores = (math.sqrt(share) * common + math.sqrt(1 - share) * own).double() / DENSE_TEMPERATURE
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf).softmax(-1)


FAMILIES = {"sparse": sparse_heads, "dense": dense_heads}
DRAW_BATCHES = 8  # a cell's draws come in this many batches; it stops early once every share is known to +-3 points
HALF_WIDTH = 0.03
DRAW_CHUNK = 32  # draws evaluated together: 26 MB at n = 100, 8 heads, under glibc's 32 MB mmap ceiling, so memory
#                  is reused rather than faulted in afresh (1.1x-1.5x faster here than 256 at a time)


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


def multi_head_cells(args):
    """The (heads, task) cells of --heads and --tasks with more than one head: the ones that combine heads."""
    return [(h, t) for t in args.tasks for h in args.heads if h > 1]


def trained_runs(parser, cfg, args, device, ckpt_dir):
    """[(run, {(heads, task): model})] of every trained multi-head model: --seed's (trained first where missing),
    config.SEEDS' runs where present (not with --quick) and the authors' where present."""
    runs, cells = runs_of(args.seed, () if args.quick else SEEDS, ckpt_dir, args.quick), multi_head_cells(args)
    with input_errors(parser):
        loaded = [(runs[0], models_of(cfg, cells, args, device, ckpt_dir))]
        return loaded + (load_runs(cfg, cells, runs[1:], device) if len(runs) > 1 else [])


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


def plot_amplification(table, trained):
    """Share of draws whose combination beats its best head against head diversity: a row per family, a column per
    n, a line per head count with its Wilson 95% band; the trained layers (their sequence length's column) as points,
    a point's height the share of its sequences that amplify."""
    families, sizes = list(FAMILIES), sorted(set(table.n))
    head_counts = sorted(set(table.heads) | set(trained.heads))
    colour = {h: f"C{k}" for k, h in enumerate(head_counts)}
    fig, axes = plt.subplots(len(families), len(sizes), figsize=(3.4 * len(sizes), 3.0 * len(families)),
                             sharex=True, sharey=True, squeeze=False)
    for row, family in enumerate(families):
        for col, n in enumerate(sizes):
            ax = axes[row, col]
            for heads, curve in table[(table.family == family) & (table.n == n)].groupby("heads"):
                curve = curve.sort_values("diversity")
                ax.plot(curve.diversity, 100 * curve.fidelity_share, "o-", ms=3, color=colour[heads],
                        label=f"random, {heads} heads")
                ax.fill_between(curve.diversity, 100 * curve.fidelity_share_low, 100 * curve.fidelity_share_high,
                                color=colour[heads], alpha=0.2, lw=0)
            _trained_points(ax, trained[trained.n == n], colour)
            ax.set(title=f"{family} heads, n = {n}", ylim=(-3, 103))
            ax.set_xlabel("head diversity (mean TV)" if row == len(families) - 1 else "")
            ax.set_ylabel("combination beats best head (%)" if col == 0 else "")
    fig.legend(handles=_legend_handles(colour, set(table.heads)), loc="lower center", ncol=4, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


MARKERS = {"copy": "s", "cycle": "^"}


def _trained_points(ax, trained, colour):
    """The trained layers as points: colour = head count, marker = task, hollow = the authors'."""
    for (heads, task, authors), part in trained.groupby(["heads", "task", trained.run == AUTHORS]):
        ax.scatter(part.diversity, 100 * part.fidelity_share, s=14, marker=MARKERS[task], lw=0.8, zorder=3,
                   facecolors="none" if authors else colour[heads], edgecolors=colour[heads])


def _legend_handles(colour, random_heads):
    """A line per head count (the colours), a marker per task and one for the authors' layers."""
    lines = [Line2D([], [], color=c, marker="o" if h in random_heads else None, ms=3,
                    label=f"{h} heads" + ("" if h in random_heads else " (trained only)")) for h, c in colour.items()]
    points = [Line2D([], [], ls="", marker=marker, color="grey", label=f"trained layer, {task}")
              for task, marker in MARKERS.items()]
    return lines + points + [Line2D([], [], ls="", marker="s", mfc="none", color="grey", label="the authors' layer")]


WORKED_BETAS = (0.1, 0.25, 0.5, 0.75, 0.9)  # head 1's weight in the worked argument's table


def _share(table, proxy):
    return [f"{100 * s:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" for s, lo, hi in
            zip(table[f"{proxy}_share"], table[f"{proxy}_share_low"], table[f"{proxy}_share_high"])]


def map_view(table):
    """The Markdown view of the map: one row per family, n, head count and share level."""
    return pd.DataFrame({
        "family": table.family, "n": table.n, "heads": table.heads, "share": table.share, "draws": table.samples,
        "diversity": table.diversity.map(lambda x: f"{x:.3f}"),
        "best head φ (%)": table.fidelity_best_head.map(lambda x: f"{x:.4f}"),
        "beats best head [95% CI]": _share(table, "fidelity"),
        "gain (pp)": table.fidelity_gain.map(lambda x: f"{x:+.4f}"),
        "synergy (pp)": table.fidelity_synergy.map(lambda x: f"{x:+.4f}"),
        "learned-like weights: beats": (100 * table.learned_fidelity_share).map(lambda x: f"{x:.1f}%"),
        "mixing time: faster than fastest head": _share(table, "mixing_time"),
        "gain (steps)": table.mixing_time_gain.map(lambda x: f"{x:+.3f}"),
        "ε-mixing: faster": _share(table, "epsilon_mixing_time"),
        "ε gain (steps)": table.epsilon_mixing_time_gain.map(lambda x: f"{x:+.2f}")})


def trained_view(placed):
    """The Markdown view of the trained layers on the map."""
    pct = lambda x: "–" if pd.isna(x) else f"{100 * x:.1f}%"
    return pd.DataFrame({
        "run": placed.run, "task": placed.task, "heads": placed.heads, "layer": placed.layer,
        "diversity": placed.diversity.map(lambda x: f"{x:.3f}"),
        "beats best head (sequences) [95% CI]": _share(placed, "fidelity"),
        "gain (pp)": placed.fidelity_gain.map(lambda x: f"{x:+.4f}"),
        "synergy (pp)": placed.fidelity_synergy.map(lambda x: f"{x:+.4f}"),
        "uniform weights: beats": placed.uniform_fidelity_share.map(pct),
        "log-weight spread": placed.weight_log_spread.map(lambda x: f"{x:.3f}"),
        **{f"random {family} heads there": placed[f"random_{family}_share"].map(pct) for family in FAMILIES}})


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


def amplification_markdown(worked, table, placed, cfg):
    """amplification.md: the worked argument, the findings (conditions), the map and the trained layers."""
    return "\n".join([
        "# When does combining heads amplify fidelity? (theory.py --amplification)", "",
        "## Section 3's worked argument", "",
        "Nodes u, v, τ with self-loops; head 1 has the edge u→v, head 2 the edge v→τ; in-degree normalised. "
        f"φ_u = max over t ≤ {cfg.horizon} of (Δᵗ)[τ, u]; the cross term Δ₂Δ₁ alone puts β₁β₂/4 of u's signal at "
        "the sink after two steps.", "", table_view(worked).to_markdown(index=False), "",
        "## Findings", "", *[f"- {line}" for line in conditions(table, placed)], "",
        "## The map: random head sets, uniform weights", "",
        f"Per cell up to {cfg.amplification_draws} seeded draws (fewer once every share's Wilson 95% interval is "
        f"within ±{100 * HALF_WIDTH:.0f} points). Fidelity in percent (the paper's, horizon {cfg.horizon}); gain = "
        "combination − best head, synergy = combination − the same heads in parallel (positive = the combination "
        "helps; for mixing times, fewer steps). Learned-like weights: log-normal with the widest spread of the "
        "trained layers' learned weights.", "", map_view(table).to_markdown(index=False), "",
        "## The trained layers on the map", "",
        "Each layer over its 50 evaluation sequences (those of synergy.py), learned head weights; the random heads' "
        "share at the same diversity, same head count and n, interpolated along the map (– where none).", "",
        trained_view(placed).to_markdown(index=False), ""])


def map_jobs(args, device):
    """The map's worker processes: --jobs, else one per CPU core on the CPU (one with --quick: seconds either way,
    and no start-up of workers); on a GPU, this process alone."""
    if device.type != "cpu":
        return 1
    return args.jobs or (1 if args.quick else os.cpu_count() or 1)


def write_amplification(parser, cfg, args, *, device, ckpt_dir, out):
    """--amplification: the trained layers, the map (learned-like weights as wide as the widest trained spread), the
    worked argument; OUT/theory/amplification.{csv,md,png,pdf} and amplification_trained.csv."""
    loaded = trained_runs(parser, cfg, args, device, ckpt_dir)
    with worker_pool(map_jobs(args, device)) as pool:
        began = time.perf_counter()
        trained = trained_layers(loaded, cfg, multi_head_cells(args), pool)
        print(f"trained layers: {time.perf_counter() - began:.1f} s")
        spread = float(trained[trained.run != AUTHORS].weight_log_spread.max())  # the widest of our layers'
        began = time.perf_counter()
        table = amplification_map(cfg, args.seed, spread, device=device, pool=pool)
    placed = place_on_map(trained, table)
    worked = worked_argument(WORKED_BETAS, cfg.horizon)
    print(f"map: {time.perf_counter() - began:.1f} s ({int(table.samples.sum())} draws, learned-like weights of "
          f"log-spread {spread:.3f})")
    folder = out / "theory"
    write_atomic(folder / "amplification.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_atomic(folder / "amplification_trained.csv", lambda tmp: placed.to_csv(tmp, index=False))
    write_text(folder / "amplification.md", amplification_markdown(worked, table, placed, cfg))
    save_figure(plot_amplification(table, placed), folder / "amplification")
    print("\n".join(conditions(table, placed)))
    print(f"wrote {folder}/amplification.csv, amplification_trained.csv, amplification.md, amplification.png, .pdf")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_args(parser, HEADS)
    parser.add_argument("--graphs", action="store_true",
                        help="Vitvitskyi et al.'s graph families instead of the trained models: OUT/theory/graphs.*")
    parser.add_argument("--amplification", action="store_true",
                        help="the map of when combining heads amplifies fidelity: random head sets at controlled "
                             "diversity, with every trained layer (ours and the authors' where present) on it: "
                             "OUT/theory/amplification.*")
    args = parser.parse_args()
    if args.amplification and (args.seeds is not None or args.official or args.graphs):
        parser.error("--amplification places every trained run there is (ours and the authors' where present); it "
                     "cannot be combined with --seeds, --official or --graphs")
    cfg, device, ckpt_dir, out = resolve_evaluation(parser, args)
    if args.amplification:
        return write_amplification(parser, cfg, args, device=device, ckpt_dir=ckpt_dir, out=out)
    if args.graphs:
        table = graph_rows(QUICK_GRAPH_SIZE if args.quick else max(max(s) for s in GRAPH_SIZES.values()), args.seed)
        print(table_view(table).to_markdown(index=False))
        (out / "theory").mkdir(parents=True, exist_ok=True)
        save_table(table, out / "theory" / "graphs", view=table_view(table))
        print(f"wrote {out}/theory/graphs.csv, .md")
        return
    cells = [(h, t) for t in args.tasks for h in args.heads]
    if args.seeds is not None:
        return write_runs(parser, cfg, cells, args, ckpt_dir=ckpt_dir, device=device, out=out)
    with input_errors(parser):
        models = models_of(cfg, cells, args, device, ckpt_dir)
    write_one_run(models, cfg, args, out / "theory")


if __name__ == "__main__":
    main()
