"""The paper's mixing-time theory put to the test: Theorem 2.9 on every trained layer, mixing across sequence length,
and Vitvitskyi et al.'s graph families, with the epsilon-mixing time of proxies.py.

    python theory.py --graphs           # results/theory/graphs.{csv,md}: line, fully connected and Poisson graphs
    python theory.py                    # seed 42's models: results/theory/theorem29.*, prefix.*, growth.*
    python theory.py --seeds 0 1 2 3 4  # every run: results/seeds/theorem29_runs.*, prefix_runs.*, claims.*
    python theory.py --official         # the authors' models: results/official/theory/

Theorem 2.9 (from summaries of the paper): the layer's walk W = sum_h w_h W_h (each head's attention column-
normalised into a walk toward the sink) mixes within 2N/p steps, N = n - 1, p = sum_h w_h p_h, p_h the head's
probability of stepping toward the sink. We take p_h at the head's worst node, which makes the bound rigorous when
N p > ln(2 / epsilon) (docs/theory.md derives it), and report the mean node's beside it. The mixing time is
Vitvitskyi et al.'s averaged epsilon-mixing time (epsilon = 1/4, their published convention); the bound is checked
against the worst start. The prefix study reads each trained layer on its first n tokens (under a causal mask, the
top-left n x n block of its attention) and asks whether its mixing time grows like log n or like n. Files and
flags as the other scripts; the evaluation itself is evaluation.theory_rows.
"""
import argparse
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import proxies
from claims import claims_markdown, growth_fit
from config import GRAPH_SIZES, HEADS, POISSON_DRAWS, POISSON_P, QUICK_GRAPH_SIZE
from evaluation import theory_rows
from runs import evaluate_runs, runs_of, write_study
from script_io import add_evaluation_args, input_errors, resolve_evaluation, save_figure, save_table
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_args(parser, HEADS)
    parser.add_argument("--graphs", action="store_true",
                        help="Vitvitskyi et al.'s graph families instead of the trained models: OUT/theory/graphs.*")
    args = parser.parse_args()
    cfg, device, ckpt_dir, out = resolve_evaluation(parser, args)
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
