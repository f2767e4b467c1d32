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
each run (main.CLAIMS) and counted over runs, from whichever of section4_runs, tables56_runs (test_amplification.py
--seeds) and synergy_runs (synergy.py --seeds) are in that folder.
"""
import argparse
import time
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from scipy import stats

import proxies
from sequence_datasets import make_dataset
from config import HEADS
from script_io import (AUTHORS, across_runs, across_runs_view, add_evaluation_args, deadline_of, input_errors,
                       resolve_common, runs_of, save_figure, save_table, write_atomic)
from train import ensure_models, load_runs


# Evaluating the same checkpoints on another CPU, GPU or torch version changes float32 attention in its last bits;
# every mean and std of section4.csv then agrees within this (steps, or percentage points). Measured: a 1e-6 relative
# perturbation of every weight moves no value by more than 2e-5.
CROSS_MACHINE_ATOL = 1e-3


def evaluation_sequences(cfg, task, seed):
    """The paper's protocol: the first sequence of each of eval_sequences shuffled training batches."""
    data = make_dataset(task, cfg.num_sequences, cfg.seq_length, cfg.vocab_size, seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    first_of_batches = order[::cfg.batch_size][:cfg.eval_sequences]
    if len(first_of_batches) < cfg.eval_sequences:
        raise ValueError(f"{cfg.eval_sequences} evaluation sequences need {cfg.eval_sequences} batches, "
                         f"but the data has only {len(first_of_batches)}")
    return data.inputs[first_of_batches]


def evaluate(model, tokens, cfg, estimator="exact", seed=0):
    """Per-sequence, per-layer proxies: dict of (S, L) arrays."""
    attn = model.attention(tokens)  # (S, L, H, T, T)
    weights = proxies.model_head_weights(model)  # (L, H), shared by every sequence
    C = proxies.combine_heads(attn, weights)[..., None, :, :]  # combined once: (S, L, 1, T, T)
    if estimator == "exact":
        mixing = proxies.mixing_time(C, max_steps=cfg.max_steps)
    else:
        mixing = proxies.mixing_time_mc(C, num_simulations=cfg.num_simulations, max_steps=cfg.max_steps, seed=seed)
    return {"mixing_time": mixing,
            "fidelity": proxies.minimax_fidelity(C, horizon=cfg.horizon),
            "mixing_time_normalized": proxies.mixing_time_normalized(C, max_steps=cfg.max_steps)}


def summarise(values, task, heads, estimator):
    """Rows of mean and std over sequences, one per layer."""
    rows = []
    for layer in range(values["fidelity"].shape[1]):
        row = {"task": task, "heads": heads, "layer": layer + 1, "estimator": estimator}
        for name, v in values.items():
            row[f"{name}_mean"], row[f"{name}_std"] = v[:, layer].mean(), v[:, layer].std()
        rows.append(row)
    return rows


SECTION4_PROXIES = {"mixing_time": "mixing_time_mean", "fidelity": "fidelity_mean",
                    "mixing_time_normalized": "mixing_time_normalized_mean"}


def section4_rows(models, cfg, seed, estimator="exact"):
    """summarise() rows of every (heads, task) model, each task's models on its evaluation sequences for `seed`."""
    rows = []
    for task in dict.fromkeys(task for _, task in models):
        tokens = evaluation_sequences(cfg, task, seed)
        rows += [row for (heads, t), model in models.items() if t == task
                 for row in summarise(evaluate(model, tokens, cfg, estimator, seed), task, heads, estimator)]
    return rows


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


# The claims, each a precise test on one run's table: name -> (table, what it says, test). A test takes one run's
# rows and returns {(task, heads, layer): holds}; "all" stands for a claim over every head count or layer.
def _by(part, keys):
    return part.groupby(keys, sort=False)


def _one_head_slowest(t):
    return {(task, "1 vs all", layer): bool((g.set_index("heads").mixing_time_mean.drop(1) < g.set_index("heads")
                                             .mixing_time_mean[1]).all())
            for (task, layer), g in _by(t, ["task", "layer"]) if 1 in set(g.heads) and g.heads.nunique() > 1}


def _fidelity_rises(t):
    return {(task, "all", layer): bool(g.sort_values("heads").fidelity_mean.diff().dropna().gt(0).all())
            for (task, layer), g in _by(t, ["task", "layer"]) if g.heads.nunique() > 1}


def _last_cycle_layer(proxy):
    def test(t):
        out = {}
        for heads, g in _by(t[t.task == "cycle"], ["heads"]):
            g = g.set_index("layer")
            last, rest = g.loc[g.index.max()], g.drop(g.index.max())
            slowest = bool((last.mixing_time_mean >= rest.mixing_time_mean).all())
            poorest = bool((last.fidelity_mean <= rest.fidelity_mean).all())
            out["cycle", heads[0], "last"] = {"mixing_time": slowest, "fidelity": poorest, "both": slowest and poorest}[
                proxy]
        return out
    return test


def _layer1_fast(t):
    return {(r.task, r.heads, 1): bool(r.mixing_time_mean < 4) for r in t[t.layer == 1].itertuples()}


def _copy_8_16_alike(t):
    g = t[t.task == "copy"].set_index(["heads", "layer"])
    if not {8, 16} <= set(g.index.get_level_values(0)):
        return {}
    return {("copy", "8 vs 16", layer): bool(abs(g.mixing_time_mean[8, layer] - g.mixing_time_mean[16, layer]) <= 0.1
                                            and abs(g.fidelity_mean[8, layer] - g.fidelity_mean[16, layer]) <= 0.1)
            for layer in sorted(set(g.loc[8].index) & set(g.loc[16].index))}


def _cycle_deep_collapse(t):
    c = t[(t.task == "cycle") & (t.heads > 1)]
    return {("cycle", heads[0], ">= 3"): bool(((g.layer >= 3) & (g.mixing_time_mean > 20) & (g.fidelity_mean < 0.05))
                                              .any()) for heads, g in _by(c, ["heads"])}


def _per_row(condition, proxy=None):
    def test(t):
        t = t if proxy is None else t[t.proxy == proxy]
        return {(r.task, r.heads, r.layer): bool(condition(r)) for r in t.itertuples()}
    return test


def _majority(r, sign):
    decided = r.samples - r.ties
    return r.p_value < 0.05 and sign * (r.wins - decided / 2) > 0


def _diversity_goes_with_synergy(proxy):
    def test(t):
        t = t[t.proxy == proxy]
        if len(t) < 3 or t.synergy.nunique() < 2 or t.diversity.nunique() < 2:
            return {}
        result = stats.spearmanr(t.diversity, t.synergy)
        return {("all", "all", "all"): bool(result.statistic > 0 and result.pvalue < 0.05)}
    return test


CLAIMS = [
    ("section4", "one_head_mixes_slowest", "paper",
     "mixing_time_mean of the 1-head model > that of every multi-head model (per task and layer)", _one_head_slowest),
    ("section4", "fidelity_rises_with_heads", "paper",
     "fidelity_mean strictly increasing over the head counts 1 < 4 < 8 < 16 (per task and layer)", _fidelity_rises),
    ("section4", "last_cycle_layer_poorest_both", "paper",
     "cycle, per head count: the last layer's mixing_time_mean >= and fidelity_mean <= every other layer's",
     _last_cycle_layer("both")),
    ("section4", "last_cycle_layer_slowest", "paper",
     "cycle, per head count: the last layer's mixing_time_mean >= every other layer's",
     _last_cycle_layer("mixing_time")),
    ("section4", "last_cycle_layer_lowest_fidelity", "paper",
     "cycle, per head count: the last layer's fidelity_mean <= every other layer's", _last_cycle_layer("fidelity")),
    ("section4", "layer1_mixes_under_4_steps", "README", "layer 1: mixing_time_mean < 4 steps", _layer1_fast),
    ("section4", "copy_8_and_16_heads_alike", "README",
     "copy, per layer: |mixing time 8 heads - 16 heads| <= 0.1 steps and |fidelity| difference <= 0.1 points",
     _copy_8_16_alike),
    ("section4", "cycle_deep_layer_collapses", "README",
     "cycle, per multi-head model: some layer >= 3 has mixing_time_mean > 20 steps and fidelity_mean < 0.05%",
     _cycle_deep_collapse),
    ("tables56", "combination_beats_best_head_one_sequence", "paper",
     "Tables 5-6, the paper's protocol: combined fidelity > best single head's on sample 0",
     _per_row(lambda r: r.amplification)),
    ("tables56", "combination_wins_majority", "paper",
     "over the fresh sequences: combined > best head in more than half the decided ones, sign test p < 0.05",
     _per_row(lambda r: _majority(r, +1))),
    ("tables56", "combination_loses_majority", "README",
     "over the fresh sequences: combined > best head in fewer than half the decided ones, sign test p < 0.05",
     _per_row(lambda r: _majority(r, -1))),
    *[("synergy", f"synergy_{sign_name}_{proxy}", "title",
       f"{proxy}: mean paired synergy (combined vs parallel heads) {'>' if sign > 0 else '<'} 0, Wilcoxon p < 0.05",
       _per_row(lambda r, sign=sign: sign * r.synergy > 0 and r.p_value < 0.05, proxy))
      for proxy in ("fidelity", "mixing_time") for sign_name, sign in (("positive", 1), ("negative", -1))],
    ("synergy", "best_head_mixes_faster", "README",
     "mixing time: best single head < combination (mean paired difference), Wilcoxon p < 0.05",
     _per_row(lambda r: r.gain_over_best < 0 and r.gain_over_best_p < 0.05, "mixing_time")),
    ("synergy", "combination_beats_best_head_fidelity", "README",
     "fidelity: combination > best single head (mean paired difference), Wilcoxon p < 0.05",
     _per_row(lambda r: r.gain_over_best > 0 and r.gain_over_best_p < 0.05, "fidelity")),
    *[("synergy", f"diversity_goes_with_synergy_{proxy}", "README",
       f"{proxy}: Spearman rho(head diversity, synergy) over every task, head count and layer > 0, p < 0.05",
       _diversity_goes_with_synergy(proxy)) for proxy in ("fidelity", "mixing_time")],
]
RUN_TABLES = {"section4": "section4_runs.csv", "tables56": "tables56_runs.csv", "synergy": "synergy_runs.csv"}


def count_claims(tables):
    """tables: {"section4" | "tables56" | "synergy": per-run table}. For every claim and (task, heads, layer): in how
    many of our runs it holds, out of how many, which, and whether it holds for the authors' models ("" if absent)."""
    rows = []
    for source, claim, origin, test_text, test in CLAIMS:
        if source not in tables:
            continue
        results = {}
        for run, part in tables[source].groupby("run", sort=False):
            for key, holds in test(part).items():
                results.setdefault(key, {})[str(run)] = holds
        for (task, heads, layer), by_run in results.items():
            ours = {run: holds for run, holds in by_run.items() if run != AUTHORS}
            rows.append({"claim": claim, "task": task, "heads": heads, "layer": layer,
                         "runs_holding": sum(ours.values()), "runs": len(ours),
                         "holding": " ".join(run for run, holds in ours.items() if holds),
                         "authors_holds": by_run.get(AUTHORS, ""), "source": origin, "test": test_text})
    return pd.DataFrame(rows, columns=["claim", "task", "heads", "layer", "runs_holding", "runs", "holding",
                                       "authors_holds", "source", "test"])


def claims_markdown(claims):
    """Per claim: its test, how many of its instances hold in every run, in some, in none; then the full table."""
    lines = ["# The claims, counted over training runs", "",
             "Each claim is tested on each run alone; `runs_holding` of `runs` of ours hold it (the authors' models, "
             "where present, apart). source: paper = the paper's claim, title = its title claim, README = ours.", ""]
    for claim, part in claims.groupby("claim", sort=False):
        every, none = int((part.runs_holding == part.runs).sum()), int((part.runs_holding == 0).sum())
        authors = part.authors_holds[part.authors_holds != ""]
        lines.append(f"- **{claim}** ({part.source.iloc[0]}): {part.test.iloc[0]}. Of {len(part)} instance(s): "
                     f"{every} hold in every run of ours, {len(part) - every - none} in some, {none} in none"
                     + (f"; the authors' models: {int(authors.astype(bool).sum())} of {len(authors)}." if len(authors)
                        else "."))
    view = claims.drop(columns=["source", "test"])
    return "\n".join(lines + ["", view.to_markdown(index=False), ""])


def write_claims(folder):
    """claims.csv and claims.md in `folder`, from whichever per-run tables it holds."""
    tables = {source: pd.read_csv(folder / name, dtype={"run": str}) for source, name in RUN_TABLES.items()
              if (folder / name).is_file()}
    claims = count_claims(tables)
    save_table(claims, folder / "claims")
    write_atomic(folder / "claims.md", lambda tmp: Path(tmp).write_text(claims_markdown(claims)))
    return claims


def models_of(parser, args, cfg, device, ckpt_dir, cells):
    """--seed's models of `cells` in ckpt_dir, those missing trained first (every one with --retrain); bad input is a
    one-line error."""
    with input_errors(parser):
        models = ensure_models(cfg, cells, args.seed, device, ckpt_dir, getattr(args, "retrain", False), args.jobs,
                               args.threads, deadline_of(args.time_budget), args.group)
    return {cell: model for cell, (model, _) in models.items()}


def evaluate_runs(parser, args, cfg, device, ckpt_dir, cells, rows_of):
    """--seeds: every run's present cells through rows_of(models, seed) -> rows, one table with a `run` column."""
    with input_errors(parser):
        loaded = load_runs(cfg, cells, runs_of(args, ckpt_dir, args.quick), device)
    if not loaded:
        parser.exit(2, f"{parser.prog}: error: no checkpoint of {', '.join(f'{h}_heads_{t}' for h, t in cells)} "
                       f"in {ckpt_dir} or {ckpt_dir}/seeds/seed_S for any S of --seeds\n")
    return pd.DataFrame([{"run": run.name, **row} for run, models in loaded for row in rows_of(models, run.seed)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_args(parser, HEADS)
    parser.add_argument("--epochs", type=int, default=None, help="epochs for cells trained now (default: the config's)")
    parser.add_argument("--retrain", action="store_true", help="train every cell even if its checkpoint exists")
    parser.add_argument("--estimator", choices=("exact", "mc"), default="exact",
                        help="mixing time: exact expectation (default) or the authors' 500-walk Monte Carlo")
    args = parser.parse_args()
    cfg, device, ckpt_dir, out = resolve_common(parser, args, default_out="results")
    cells = [(h, t) for t in args.tasks for h in args.heads]
    if args.seeds is not None:
        per_run = evaluate_runs(parser, args, cfg, device, ckpt_dir, cells,
                                lambda models, seed: section4_rows(models, cfg, seed, args.estimator))
        across = across_runs(per_run, ["task", "heads", "layer"], SECTION4_PROXIES, name="proxy")
        save_table(per_run, out / "section4_runs", view=markdown_view(per_run))
        save_table(across, out / "section4_across_runs", view=across_runs_view(across))
        fig = plot_runs(per_run, across)
        save_figure(fig, out / "section4_runs")
        plt.close(fig)
        claims = write_claims(out)
        print(claims_markdown(claims).split("\n\n|")[0])
        print(f"wrote {out}/section4_runs.*, section4_across_runs.*, claims.*")
        return
    models = models_of(parser, args, cfg, device, ckpt_dir, cells)
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
    fig = plot(table)
    save_figure(fig, out / "section4")
    plt.close(fig)
    print(f"wrote {out}/section4.csv, section4.md, section4.png, section4.pdf")


if __name__ == "__main__":
    main()
