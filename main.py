"""Section 4: the two proxies, per layer, of parameter-matched 1/4/8/16-head Transformers on copy and cycle.

    python main.py                                              # our checkpoints in checkpoints/ (trained if missing)
    python main.py --official                                   # the authors' released models (fetched once)
    python main.py --quick                                      # tiny end-to-end run, seconds on a CPU

For every model and layer: mixing time and minimax fidelity of the layer's attention with learned head weights,
mean +- std (population std, ddof=0) over 50 training sequences, printed as the authors' lines; plus the mixing
time of the principled (column-normalised) walk. Writes section4.csv, section4.md and section4.png/.pdf under --out.
"""
import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch

import proxies
from sequence_datasets import make_dataset
from script_io import add_evaluation_args, deadline_of, resolve_common, save_figure, save_table
from train import HEADS, ensure_models


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


def markdown_view(table):
    pm = lambda name, unit="": [f"{m:.2f}{unit} ± {s:.2f}{unit}" for m, s in
                                zip(table[f"{name}_mean"], table[f"{name}_std"])]
    return pd.DataFrame({"task": table.task, "heads": table.heads, "layer": table.layer,
                         "mixing time": pm("mixing_time"), "fidelity": pm("fidelity", "%"),
                         "mixing time (normalized walk)": pm("mixing_time_normalized")})


def plot(table):
    layers = sorted(table.layer.unique())
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers), 5.6), sharex=True, squeeze=False)
    for col, layer in enumerate(layers):
        for row, (name, label) in enumerate([("mixing_time", "Mixing time (steps)"), ("fidelity", "Fidelity (%)")]):
            ax = axes[row, col]
            for task in table.task.unique():
                part = table[(table.layer == layer) & (table.task == task)].sort_values("heads")
                ax.errorbar(part.heads, part[f"{name}_mean"], yerr=part[f"{name}_std"], marker="o", capsize=3,
                            label=task)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(table.heads.unique()), [str(h) for h in sorted(table.heads.unique())])
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"Layer {layer}")
            if row == 1:
                ax.set_xlabel("Number of heads")
            if col == 0:
                ax.set_ylabel(label)
    axes[0, 0].legend(frameon=False)
    fig.tight_layout()
    return fig


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
    models = ensure_models(cfg, cells, args.seed, device, ckpt_dir, args.retrain, args.jobs, args.threads,
                           deadline_of(args.time_budget))

    began, rows = time.perf_counter(), []
    for task in args.tasks:
        tokens = evaluation_sequences(cfg, task, args.seed)
        for heads in args.heads:
            values = evaluate(models[heads, task][0], tokens, cfg, args.estimator, args.seed)
            summary = summarise(values, task, heads, args.estimator)
            print(f"\n{heads} heads, {task}:")
            for r in summary:
                print(f"Layer {r['layer']} — mixing time: {r['mixing_time_mean']:.2f} ± {r['mixing_time_std']:.2f}, "
                      f"fidelity: {r['fidelity_mean']:.2f}% ± {r['fidelity_std']:.2f}%")
            rows += summary
    print(f"\nevaluation: {time.perf_counter() - began:.2f} s on {device} ({args.estimator} mixing time)")
    table = pd.DataFrame(rows)
    save_table(table, out / "section4", view=markdown_view(table))
    fig = plot(table)
    save_figure(fig, out / "section4")
    plt.close(fig)
    print(f"wrote {out}/section4.csv, section4.md, section4.png, section4.pdf")


if __name__ == "__main__":
    main()
