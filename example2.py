"""Example 2 / Figure 3: two heads whose combination reaches the sink better than either head alone.

    python example2.py [--out results/figure3] [--steps 20] [--quick]

Prints the signal (%) of u, v, w at the sink after t = 1..20 diffusion steps for head 1, head 2 and their 50/50
combination, and each graph's phi_min; writes head1/head2/multi .png (300 dpi) and .pdf, signal_at_sink.{csv,md} and
phi_min.{csv,md}. Deterministic: --seed is accepted for uniformity with the other scripts and changes nothing.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import proxies
from script_io import check_writable, save_figure, save_table

NODES = ("u", "v", "w", "tau")  # tau, the last node, is the sink
HEAD_EDGES = {
    "head1": [("u", "v"), ("v", "w"), ("w", "tau")],
    "head2": [("u", "w"), ("v", "w"), ("v", "tau"), ("w", "tau")],
}
STEPS = 20


def diffusion_matrix(edges, nodes=NODES):
    """Identity (a self-loop on every node) plus 1 at [target, source] per edge, rows normalised (row = receiver)."""
    index = {name: i for i, name in enumerate(nodes)}
    M = np.eye(len(nodes))
    for source, target in edges:
        M[index[target], index[source]] += 1
    return M / M.sum(axis=1, keepdims=True)


def graphs():
    """The three diffusion matrices of Figure 3: each head, and their 0.5/0.5 combination."""
    heads = np.stack([diffusion_matrix(HEAD_EDGES["head1"]), diffusion_matrix(HEAD_EDGES["head2"])])
    return {"head1": heads[0], "head2": heads[1], "multi": proxies.combine_heads(heads, [0.5, 0.5]).numpy()}


def analyse(steps=STEPS):
    """Per graph: signal (steps, 4) at the sink, and phi_min over the sources (the sink excluded, as in Example 2)."""
    result = {}
    for name, C in graphs().items():
        signal = proxies.sink_signal(C, horizon=steps)
        phi = proxies.per_node_fidelity(C, horizon=steps)[:-1]
        worst = int(np.argmin(phi))
        result[name] = dict(signal=signal, phi_min=float(phi[worst]), set_by=NODES[worst],
                            at_step=int(np.argmax(signal[:, worst])) + 1)
    return result


def plot(name, signal):
    steps = np.arange(1, len(signal) + 1)
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for j, node in enumerate(NODES[:-1]):
        ax.plot(steps, 100 * signal[:, j], marker="o", markersize=3, label=node)
    running_min = 100 * np.maximum.accumulate(signal[:, :-1], axis=0).min(axis=1)
    ax.plot(steps, running_min, "r--", label=r"$\phi_{\min}$")
    ax.set(xlabel="Diffusion steps", ylabel="Signal % at sink", title={"multi": "Multi-head"}.get(name, name.title()),
           xticks=steps[::2], ylim=(0, 100))
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return fig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default results/figure3, results/quick/figure3 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="for uniformity with the other scripts: the example is already tiny; only the default "
                             "output folder changes")
    parser.add_argument("--steps", type=int, default=STEPS, help="diffusion steps shown (the paper: 20)")
    parser.add_argument("--seed", type=int, default=0, help="unused: the example is deterministic")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    args.out = args.out or Path("results/quick/figure3" if args.quick else "results/figure3")
    check_writable(parser, args.out)
    result = analyse(args.steps)
    table = pd.DataFrame({"step": np.arange(1, args.steps + 1)})
    for name, r in result.items():
        for j, node in enumerate(NODES[:-1]):
            table[f"{name}_{node}_%"] = 100 * r["signal"][:, j]
    print("Signal % at the sink\n" + table.to_string(index=False, float_format="%.2f"))
    summary = pd.DataFrame([{"graph": name, "phi_min": round(r["phi_min"], 5), "set_by": r["set_by"],
                             "at_step": r["at_step"]} for name, r in result.items()])
    for name, r in result.items():
        print(f"{name}: phi_min = {r['phi_min']:.4f} (node {r['set_by']}, step {r['at_step']})")
    save_table(table.round(6), args.out / "signal_at_sink")
    save_table(summary, args.out / "phi_min")
    for name, r in result.items():
        fig = plot(name, r["signal"])
        save_figure(fig, args.out / name)
        plt.close(fig)
    print(f"wrote {args.out}/: head1, head2, multi (.png, .pdf), signal_at_sink.csv, phi_min.{{csv,md}}")


if __name__ == "__main__":
    main()
