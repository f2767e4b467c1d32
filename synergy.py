"""Beyond the paper: is the multi-head gain synergy (paths that switch heads), or what parallel heads would give?

    python synergy.py                 # our checkpoints (checkpoints/), writes results/synergy.*
    python synergy.py --official      # the authors' released models, writes results/official/synergy.*
    python synergy.py --quick         # tiny end-to-end run, seconds on a CPU
    python synergy.py --seeds 0 1 2 3 4   # every training run: results/seeds/synergy_*

For the 4/8/16-head models of both tasks, every layer, the 50 evaluation sequences of Section 4 (those of main.py):
the layer's combination C = sum_h w_h A_h against the counterfactual in which the same heads act as parallel
channels and no path switches heads (proxies.parallel_minimax_fidelity, proxies.parallel_mixing_time), and against
the best single head. Synergy = combined - parallel for fidelity, parallel - combined for mixing time (positive: the
combination helps), as the mean paired per-sequence difference with a t 95% confidence interval and a two-sided
Wilcoxon signed-rank p-value (scipy.stats). Beside it, head diversity: the mean total-variation distance between
two heads' attention rows, over head pairs, query rows 1..T-1 (row 0 is the same in every causal head) and
sequences, and its Spearman rank correlation with synergy. Writes synergy.csv (long format), synergy.md and
synergy.png/.pdf under --out. With --seeds, every training run (each on its own evaluation sequences), into
OUT/seeds/: synergy_runs (one row per run, with each run's interval and p), synergy_across_runs (mean, std and
t-interval over our runs of synergy and gain over the best head, the authors' beside), synergy_runs.png/.pdf and the
claims (claims.py). The evaluation itself: evaluation.synergy_rows.
"""
import argparse

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from config import AMPLIFICATION_HEADS, AUTHORS
from evaluation import correlations, synergy_rows
from runs import evaluate_runs, runs_of, write_study
from script_io import (add_evaluation_args, authors_checkpoints, input_errors, resolve_evaluation, save_figure,
                       write_atomic, write_text)
from train import models_of

PROXIES = {"fidelity": "minimax fidelity (%)", "mixing_time": "mixing time (steps)"}
ACROSS_RUNS = {"synergy": "synergy", "gain_over_best": "gain_over_best"}


def markdown_view(table):
    """The formatted table, one row per (task, heads, layer, proxy) (and run, where the table has runs)."""
    fmt = lambda x: f"{x:.3f}"
    return pd.DataFrame({
        **({"run": table.run} if "run" in table else {}), "task": table.task, "heads": table.heads,
        "layer": table.layer, "proxy": table.proxy,
        "combined": table.combined.map(fmt), "parallel": table.parallel.map(fmt), "best head": table.best_head.map(fmt),
        "synergy [95% CI]": [f"{s:+.3f} [{lo:+.3f}, {hi:+.3f}]" for s, lo, hi in
                             zip(table.synergy, table.ci_low, table.ci_high)],
        "p": table.p_value.map(lambda p: f"{p:.2g}"),
        "gain over best head": table.gain_over_best.map(lambda g: f"{g:+.3f}"),
        "p (gain)": table.gain_over_best_p.map(lambda p: f"{p:.2g}"),
        "head diversity (TV)": table.diversity.map(fmt)})


def markdown(table, correlation, source):
    view = markdown_view(table)
    lines = [f"# Synergy: combined heads against the same heads as parallel channels ({source})", "",
             "Positive synergy or gain = the combination helps (higher fidelity, lower mixing time). Means over "
             f"{int(table.sequences.iloc[0])} sequences; 95% t intervals of the mean paired difference; two-sided "
             "Wilcoxon signed-rank p-values.", ""]
    for proxy, part in table.groupby("proxy", sort=False):
        significant, gain_significant = part[part.p_value < 0.05], part[part.gain_over_best_p < 0.05]
        rho, p = correlation[proxy]
        lines.append(f"- {PROXIES[proxy]}: synergy > 0 at p < 0.05 in {int((significant.synergy > 0).sum())} of "
                     f"{len(part)} layers, < 0 in {int((significant.synergy < 0).sum())}; combination better than the "
                     f"best head at p < 0.05 in {int((gain_significant.gain_over_best > 0).sum())}"
                     f", worse in {int((gain_significant.gain_over_best < 0).sum())}; "
                     f"Spearman rho(diversity, synergy) = {rho:+.2f} (p = {p:.2g})")
    return "\n".join(lines + ["", view.to_markdown(index=False), ""])


def _decorate(ax, task, label, layers, row, col):
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(f"{task}: synergy in {label}", fontsize=10)
    ax.set_xticks(sorted(layers))
    ax.grid(alpha=0.3)
    if row == len(PROXIES) - 1:
        ax.set_xlabel("Layer")
    if col == 0:
        ax.set_ylabel("combined vs parallel\n(> 0: combination helps)")


def plot(table):
    tasks = list(dict.fromkeys(table.task))
    fig, axes = plt.subplots(len(PROXIES), len(tasks), figsize=(4.2 * len(tasks), 6.4), squeeze=False, sharex=True)
    for row, (proxy, label) in enumerate(PROXIES.items()):
        for col, task in enumerate(tasks):
            ax = axes[row, col]
            part = table[(table.proxy == proxy) & (table.task == task)]
            heads = sorted(part.heads.unique())
            for i, h in enumerate(heads):
                p = part[part.heads == h].sort_values("layer")
                x = p.layer + (i - (len(heads) - 1) / 2) * 0.12  # side by side, so the bars do not overlap
                ax.errorbar(x, p.synergy, yerr=[p.synergy - p.ci_low, p.ci_high - p.synergy], marker="o",
                            capsize=3, label=f"{h} heads")
            _decorate(ax, task, label, part.layer.unique(), row, col)
    axes[0, 0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(per_run, across):
    """Synergy per layer: every run a small point (the authors' a cross), the mean over our runs with its 95%
    t-interval over runs."""
    tasks = list(dict.fromkeys(per_run.task))
    fig, axes = plt.subplots(len(PROXIES), len(tasks), figsize=(4.2 * len(tasks), 6.4), squeeze=False, sharex=True)
    mean = across[across.quantity == "synergy"]
    for row, (proxy, label) in enumerate(PROXIES.items()):
        for col, task in enumerate(tasks):
            ax = axes[row, col]
            heads = sorted(per_run[per_run.task == task].heads.unique())
            for i, h in enumerate(heads):
                offset = (i - (len(heads) - 1) / 2) * 0.22  # side by side within a layer
                colour = f"C{i}"
                cell = (per_run.proxy == proxy) & (per_run.task == task) & (per_run.heads == h)
                ours, theirs = per_run[cell & (per_run.run != AUTHORS)], per_run[cell & (per_run.run == AUTHORS)]
                ax.scatter(ours.layer + offset - 0.06, ours.synergy, s=10, color=colour, alpha=0.6, linewidths=0)
                ax.scatter(theirs.layer + offset - 0.06, theirs.synergy, s=20, color=colour, marker="x")
                m = mean[(mean.proxy == proxy) & (mean.task == task) & (mean.heads == h)].sort_values("layer")
                ax.errorbar(m.layer + offset, m["mean"], yerr=[m["mean"] - m.ci_low, m.ci_high - m["mean"]],
                            color=colour, marker="o", markersize=4, linestyle="", capsize=3, label=f"{h} heads")
            linthresh = 0.01 if proxy == "fidelity" else 0.1
            ax.set_yscale("symlog", linthresh=linthresh)  # small and large effects both
            shown = pd.concat([per_run[(per_run.proxy == proxy) & (per_run.task == task)].synergy,
                               mean[(mean.proxy == proxy) & (mean.task == task)][["ci_low", "ci_high"]].stack()])
            ax.set_ylim(1.6 * min(shown.min(), 0) - linthresh / 2, 1.6 * max(shown.max(), 0) + linthresh / 2)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            _decorate(ax, task, label, per_run.layer.unique(), row, col)
    handles = axes[0, 0].get_legend_handles_labels()[0] + [
        plt.Line2D([], [], color="grey", marker="o", linestyle="", markersize=3, alpha=0.6, label="one run of ours"),
        plt.Line2D([], [], color="grey", marker="x", linestyle="", label="the authors' models")]
    fig.legend(handles=handles, loc="lower center", ncol=5, frameon=False, fontsize=8,
               title="mean over our runs with its 95% t-interval; points: single runs", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_args(parser, AMPLIFICATION_HEADS)
    args = parser.parse_args()
    if min(args.heads) < 2:
        parser.error(f"--heads: the synergy study compares a combination of heads with its single heads, so every head "
                     f"count must be at least 2, got {min(args.heads)}")
    cfg, device, ckpt_dir, out = resolve_evaluation(parser, args)
    cells = [(h, t) for t in args.tasks for h in args.heads]
    if args.seeds is not None:
        runs = runs_of(args.seed, args.seeds, ckpt_dir, authors=authors_checkpoints(parser, args))
        with input_errors(parser):
            per_run = evaluate_runs(cfg, cells, runs, device,
                                    lambda models, seed: synergy_rows(models, cfg, seed))
        write_study(per_run, out, stem="synergy", keys=["task", "heads", "layer", "proxy"], values=ACROSS_RUNS,
                    name="quantity", view=markdown_view, digits=3, plot=plot_runs)
        print(f"wrote {out}/synergy_runs.*, synergy_across_runs.*, claims.*")
        return
    with input_errors(parser):
        rows = synergy_rows(models_of(cfg, cells, args, device, ckpt_dir), cfg, args.seed)
    for r in rows:
        print(f"{r['task']} {r['heads']:2d} heads layer {r['layer']} {r['proxy']:11s}: combined {r['combined']:8.3f} "
              f"parallel {r['parallel']:8.3f} best head {r['best_head']:8.3f} | synergy {r['synergy']:+.3f} "
              f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] p={r['p_value']:.2g}")
    table = pd.DataFrame(rows)
    report = markdown(table, correlations(table), "the authors' models" if args.official else f"models in {ckpt_dir}")
    write_atomic(out / "synergy.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_text(out / "synergy.md", report)
    save_figure(plot(table), out / "synergy")
    print("\n" + "\n".join(line for line in report.splitlines() if line.startswith("- ")))
    print(f"wrote {out}/synergy.csv, synergy.md, synergy.png, synergy.pdf")


if __name__ == "__main__":
    main()
