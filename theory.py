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
the epsilon-mixing time; and every trained multi-head layer of our runs (and the authors' with --with-authors) on the
same diversity axis (evaluation.layer_amplification_rows). docs/theory.md says what the map finds.
"""
import argparse
import os
import time

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np
import pandas as pd

from amplification import (HALF_WIDTH, amplification_map, conditions, place_on_map, trained_layers, worked_argument,
                           worker_pool)
from claims import claims_markdown, growth_table
from config import AUTHORS, GRAPH_SIZES, HEADS, QUICK_GRAPH_SIZE, SEEDS
from evaluation import theory_rows
from graphs import FAMILIES, graph_rows, reference_graphs
from runs import evaluate_runs, runs_of, write_study
from script_io import (add_evaluation_args, authors_checkpoints, input_errors, resolve_evaluation, save_figure,
                       save_table, table_view, write_atomic, write_text)
from train import models_of, trained_runs

THEOREM29_ACROSS = {"mixing": "mixing", "mixing_worst": "mixing_worst", "fastest_head": "fastest_head",
                    "bound": "bound", "bound_holds_share": "bound_holds_share"}
PREFIX_ACROSS = {"mixing": "mixing", "bound": "bound", "mixing_time": "mixing_time", "fidelity": "fidelity"}


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
    runs = runs_of(args.seed, args.seeds, ckpt_dir, authors=authors_checkpoints(parser, args))
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


def multi_head_cells(args):
    """The (heads, task) cells of --heads and --tasks with more than one head: the ones that combine heads."""
    return [(h, t) for t in args.tasks for h in args.heads if h > 1]


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
        f"Each layer over its {cfg.eval_sequences} evaluation sequences (those of synergy.py), learned head weights; "
        "the random heads' share at the same diversity, same head count and n, interpolated along the map (– where "
        "none).", "",
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
    runs = runs_of(args.seed, () if args.quick else SEEDS, ckpt_dir, authors=authors_checkpoints(parser, args))
    with input_errors(parser):
        loaded = trained_runs(cfg, multi_head_cells(args), args, device, runs)
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
                             "diversity, with every trained layer (ours; the authors' too with --with-authors) on it: "
                             "OUT/theory/amplification.*")
    args = parser.parse_args()
    if args.amplification and (args.seeds is not None or args.official or args.graphs):
        parser.error("--amplification places every trained run of ours there is (and the authors' with "
                     "--with-authors); it cannot be combined with --seeds, --official or --graphs")
    several_runs = args.seeds is not None or args.amplification
    cfg, device, ckpt_dir, out = resolve_evaluation(parser, args, several_runs=several_runs)
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
