"""Section 4: the two proxies, per layer, of parameter-matched 1/4/8/16-head Transformers on copy and cycle.

    python main.py                                              # our checkpoints in checkpoints/ (trained if missing)
    python main.py --official                                   # the authors' released models (fetched once)
    python main.py --quick                                      # tiny end-to-end run, seconds on a CPU
    python main.py --seeds 0 1 2 3 4                            # every training run: results/seeds/

For every model and layer: mixing time and minimax fidelity of the layer's attention with learned head weights,
mean +- std (population std, ddof=0) over 50 training sequences, printed as the authors' lines; plus the mixing
time of the principled (column-normalised) walk. Writes section4.csv, section4.md and section4.png/.pdf under --out.
With --seeds, the same for every training run (each evaluated on its own training data's sequences), into
OUT/seeds/: section4_runs (one row per run), section4_across_runs (mean, std and t-interval over our runs, the
authors' beside), section4_runs.png/.pdf, and claims.{csv,md}: each claim of the paper and of our README, tested on
each run (claims.py) and counted over runs, from whichever of section4_runs, tables56_runs (test_amplification.py
--seeds) and synergy_runs (synergy.py --seeds) are in that folder. The evaluation itself: evaluation.section4_rows.
"""
import argparse
import time

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from claims import claims_markdown
from config import AUTHORS, HEADS
from evaluation import SECTION4_PROXIES, section4_rows
from runs import evaluate_runs, runs_of, write_study
from script_io import (add_evaluation_args, authors_checkpoints, input_errors, resolve_evaluation, save_figure,
                       save_table)
from train import models_of


def markdown_view(table):
    pm = lambda name, unit="": [f"{m:.2f}{unit} ± {s:.2f}{unit}" for m, s in
                                zip(table[f"{name}_mean"], table[f"{name}_std"])]
    return pd.DataFrame({**({"run": table.run} if "run" in table else {}),
                         "task": table.task, "heads": table.heads, "layer": table.layer,
                         "mixing time": pm("mixing_time"), "fidelity": pm("fidelity", "%"),
                         "mixing time (normalized walk)": pm("mixing_time_normalized")})


def _axes_grid(layers, heads, rows=(("mixing_time", "Mixing time (steps)"), ("fidelity", "Fidelity (%)"))):
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(3.2 * len(layers), 2.8 * len(rows)), sharex=True,
                             squeeze=False)
    for (row, (_, label)), col in ((r, c) for r in enumerate(rows) for c in range(len(layers))):
        ax = axes[row, col]
        ax.set_xscale("log", base=2)
        ax.set_xticks(heads, [str(h) for h in heads])
        ax.grid(alpha=0.3)
        if row == 0:
            ax.set_title(f"Layer {layers[col]}")
        if row == len(rows) - 1:
            ax.set_xlabel("Number of heads")
        if col == 0:
            ax.set_ylabel(label)
    return fig, axes, rows


def plot(table):
    layers, heads = sorted(table.layer.unique()), sorted(table.heads.unique())
    fig, axes, rows = _axes_grid(layers, heads)
    for (row, (name, _)), (col, layer) in ((r, c) for r in enumerate(rows) for c in enumerate(layers)):
        for task in table.task.unique():
            part = table[(table.layer == layer) & (table.task == task)].sort_values("heads")
            axes[row, col].errorbar(part.heads, part[f"{name}_mean"], yerr=part[f"{name}_std"], marker="o", capsize=3,
                                    label=task)
    axes[0, 0].legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_runs(per_run, across):
    """Every run a small point (the authors' a cross), the mean over our runs a line with its 95% t-interval."""
    layers, heads = sorted(per_run.layer.unique()), sorted(per_run.heads.unique())
    fig, axes, rows = _axes_grid(layers, heads)
    colours = dict(zip(per_run.task.unique(), ("tab:blue", "tab:orange")))
    for (row, (name, _)), (col, layer) in ((r, c) for r in enumerate(rows) for c in enumerate(layers)):
        ax = axes[row, col]
        for i, (task, colour) in enumerate(colours.items()):
            shift = 2 ** ((i - 0.5) * 0.3)  # the tasks side by side on the log axis
            ours = per_run[(per_run.layer == layer) & (per_run.task == task) & (per_run.run != AUTHORS)]
            beside = shift * 2 ** -0.07  # the runs just left of their mean
            ax.scatter(ours.heads * beside, ours[f"{name}_mean"], s=12, color=colour, alpha=0.6, linewidths=0)
            theirs = per_run[(per_run.layer == layer) & (per_run.task == task) & (per_run.run == AUTHORS)]
            ax.scatter(theirs.heads * beside, theirs[f"{name}_mean"], s=22, color=colour, marker="x")
            mean = across[(across.layer == layer) & (across.task == task) & (across.proxy == name)].sort_values("heads")
            ax.errorbar(mean.heads * shift, mean["mean"],
                        yerr=[mean["mean"] - mean.ci_low, mean.ci_high - mean["mean"]], color=colour, marker="o",
                        markersize=4, capsize=3, label=f"{task}: mean of our runs, 95% CI")
        if name == "mixing_time":
            ax.set_yscale("log")  # one head's 30-80 steps beside the multi-head models' 3.6
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    handles = axes[0, 0].get_legend_handles_labels()[0] + [
        plt.Line2D([], [], color="grey", marker="o", linestyle="", markersize=3, alpha=0.6, label="one run of ours"),
        plt.Line2D([], [], color="grey", marker="x", linestyle="", label="the authors' models")]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_args(parser, HEADS)
    parser.add_argument("--estimator", choices=("exact", "mc"), default="exact",
                        help="mixing time: exact expectation (default) or the authors' 500-walk Monte Carlo")
    args = parser.parse_args()
    cfg, device, ckpt_dir, out = resolve_evaluation(parser, args)
    cells = [(h, t) for t in args.tasks for h in args.heads]
    if args.seeds is not None:
        runs = runs_of(args.seed, args.seeds, ckpt_dir, authors=authors_checkpoints(parser, args))
        with input_errors(parser):
            per_run = evaluate_runs(cfg, cells, runs, device,
                                    lambda models, seed: section4_rows(models, cfg, seed, args.estimator))
        claims = write_study(per_run, out, stem="section4", keys=["task", "heads", "layer"], values=SECTION4_PROXIES,
                             name="proxy", view=markdown_view, plot=plot_runs)
        print(claims_markdown(claims).split("\n\n|")[0])
        print(f"wrote {out}/section4_runs.*, section4_across_runs.*, claims.*")
        return
    with input_errors(parser):
        models = models_of(cfg, cells, args, device, ckpt_dir)
    began = time.perf_counter()
    rows = section4_rows(models, cfg, args.seed, args.estimator)
    for r in rows:
        if r["layer"] == 1:
            print(f"\n{r['heads']} heads, {r['task']}:")
        print(f"Layer {r['layer']} — mixing time: {r['mixing_time_mean']:.2f} ± {r['mixing_time_std']:.2f}, "
              f"fidelity: {r['fidelity_mean']:.2f}% ± {r['fidelity_std']:.2f}%")
    print(f"\nevaluation: {time.perf_counter() - began:.2f} s on {device} ({args.estimator} mixing time)")
    table = pd.DataFrame(rows)
    save_table(table, out / "section4", view=markdown_view(table))
    save_figure(plot(table), out / "section4")
    print(f"wrote {out}/section4.csv, section4.md, section4.png, section4.pdf")


if __name__ == "__main__":
    main()
