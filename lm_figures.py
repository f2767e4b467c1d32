"""The figures of the language-model studies (pretrained.py): each study's per-layer values against the layer (the
prefix study against n, as a heat map), and one figure across models and inputs.

    from lm_figures import plot_study, plot_models
    fig = plot_study("section4", tables["section4"], "smollm2, prose")     # a study's figure
    fig = plot_models({("smollm2", "prose"): tables, ...})                # per layer as a fraction of depth
"""
import matplotlib.colors
import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np

from evaluation import SINK_THRESHOLD


def _panels(label, panels):
    """A row of panels (title, y label) against the layer."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, ylabel) in zip(axes[0], panels):
        ax.set(title=f"{label}: {title}" if ax is axes[0, 0] else title, xlabel="layer", ylabel=ylabel)
    return fig, axes[0]


def _with_interval(ax, x, mean, low, high, **style):
    ax.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o", ms=4, capsize=3, **style)
    ax.axhline(0.5 if style.get("label") == "wins" else 0.0, color="grey", lw=0.8, ls=":")


def plot_section4(t, label):
    fig, (mix, fid) = _panels(label, [("mixing time (capped at 100 steps)", "steps"), ("minimax fidelity", "%")])
    mix.plot(t.layer, t.mixing_time_mean, "o-", label="the authors' walk")
    mix.plot(t.layer, t.mixing_time_normalized_mean, "s--", label="the principled walk")
    fid.plot(t.layer, t.fidelity_mean, "o-", label="100 steps")
    fid.plot(t.layer, t.fidelity_converged_mean, "s--", label="converged")
    return fig, (mix, fid)


def plot_tables56(t, label):
    fig, (fid, wins) = _panels(label, [("combination vs best head", "fidelity (%)"),
                                       ("samples where the combination wins", "share (Wilson 95%)")])
    fid.plot(t.layer, t["mean_combined_%"], "o-", label="combination")
    fid.plot(t.layer, t["mean_best_individual_%"], "s--", label="best single head")
    _with_interval(wins, t.layer, t.win_rate, t.win_ci_low, t.win_ci_high, label="wins")
    return fig, (fid, wins)


def plot_synergy(t, label):
    fig, axes = _panels(label, [("fidelity synergy", "combined − parallel (pp)"),
                                ("mixing-time synergy", "parallel − combined (steps)"),
                                ("head diversity", "mean TV")])
    for ax, proxy in zip(axes, ("fidelity", "mixing_time")):
        part = t[t.proxy == proxy]
        _with_interval(ax, part.layer, part.synergy, part.ci_low, part.ci_high, label="synergy (t 95%)")
    part = t[t.proxy == "fidelity"]
    axes[2].plot(part.layer, part.diversity, "o-", label="diversity")
    return fig, axes


def plot_theorem29(t, label):
    fig, (ax,) = _panels(label, [("Theorem 2.9: bound and ε-mixing time", "steps")])
    ax.plot(t.layer, t.bound, "o-", label="2N/p (worst node)")
    ax.plot(t.layer, t.mixing_worst, "s--", label="measured, worst start")
    ax.plot(t.layer, t.mixing, "^:", label="measured, averaged start")
    ax.set_yscale("log")
    return fig, (ax,)


def plot_prefix(t, label):
    """A heat map of layer x n (a model's many layers would hide each other's lines): the epsilon-mixing time on the
    first n tokens, log colour scale; each row labelled with its growth."""
    grid = t.pivot(index="layer", columns="n", values="mixing")
    growth = t.drop_duplicates("layer").set_index("layer").growth
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 3.5, 0.22 * grid.shape[0] + 1.6))
    finite = grid.to_numpy()[np.isfinite(grid.to_numpy())]
    norm = matplotlib.colors.LogNorm(max(finite.min(), 1), max(finite.max(), 2)) if finite.size else None
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_xticks(range(grid.shape[1]), labels=[str(n) for n in grid.columns])
    ax.set_yticks(range(grid.shape[0]), labels=[f"{layer} ({growth[layer]})" for layer in grid.index], fontsize=6)
    ax.set(title=f"{label}: ε-mixing time on the first n tokens", xlabel="n (tokens)", ylabel="layer (growth)")
    bar = fig.colorbar(image, ax=ax, label="steps (log scale; blank: not mixed)")
    for axis in (bar.ax.yaxis.set_major_formatter, bar.ax.yaxis.set_minor_formatter):
        axis(matplotlib.ticker.FormatStrFormatter("%g"))  # 40, not 4 x 10^1
    return fig, ()


def plot_sink(t, label):
    """The share of sink heads per layer, and each head's mean attention to position 0 as a layer x head map."""
    heads = [c for c in t.columns if c.startswith("head_")]
    fig, (share, grid) = _panels(label, [("sink heads (Gu et al.)", "share of heads"),
                                         ("attention to position 0", "head")])
    share.plot(t.layer, t.sink_share, "o-", label=f"share of heads above {SINK_THRESHOLD}")
    share.plot(t.layer, t.first_token_mean, "s--", label="attention to position 0, mean over heads")
    share.set_ylim(-0.03, 1.3)
    image = grid.imshow(t[heads].to_numpy().T, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest",
                        extent=(t.layer.min() - 0.5, t.layer.max() + 0.5, len(heads) + 0.5, 0.5))
    fig.colorbar(image, ax=grid, label="mean attention to position 0")
    return fig, (share,)


PLOTS = {"section4": plot_section4, "tables56": plot_tables56, "synergy": plot_synergy,
         "theorem29": plot_theorem29, "prefix": plot_prefix, "sink": plot_sink}
MODEL_PANELS = [("minimax fidelity (%, log)", "section4", "fidelity_mean", None),
                ("mixing time (steps)", "section4", "mixing_time_mean", None),
                ("samples where the combination\nbeats its best head (Wilson 95%)", "tables56", "win_rate",
                 ("win_ci_low", "win_ci_high")),
                ("fidelity synergy, combined − parallel\n(pp, t 95%)", "synergy", "synergy", ("ci_low", "ci_high")),
                (f"sink heads (attention to position 0 > {SINK_THRESHOLD})", "sink", "sink_share", None)]
INPUT_STYLES = ["-", "--", ":", "-."]  # plot_models' line style of each input, in turn


def plot_models(found):
    """One figure across models and inputs, found {(model, input): tables}: per layer as a fraction of depth, the
    fidelity, mixing time, win share against the best head, fidelity synergy and sink share; a colour a model, a
    line style an input, intervals as bands."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    models = list(dict.fromkeys(model for model, _ in found))
    inputs = list(dict.fromkeys(kind for _, kind in found))
    for ax, (title, study, column, band) in zip(axes.flat, MODEL_PANELS):
        for (model, kind), tables in found.items():
            t = tables[study][tables[study].proxy == "fidelity"] if study == "synergy" else tables[study]
            depth = t.layer / t.layer.max()
            style = dict(color=f"C{models.index(model)}", ls=INPUT_STYLES[inputs.index(kind) % len(INPUT_STYLES)])
            ax.plot(depth, t[column], marker="o", ms=2.5, lw=1.2, **style)
            if band:
                ax.fill_between(depth, t[band[0]], t[band[1]], color=style["color"], alpha=0.12, lw=0)
        ax.set(title=title, xlabel="layer / depth")
        if study == "section4" and column == "fidelity_mean":
            ax.set_yscale("log")
        if study in ("tables56", "synergy"):
            ax.axhline(0.5 if study == "tables56" else 0.0, color="grey", lw=0.8, ls=":")
    legend = axes.flat[-1]
    legend.axis("off")
    for k, model in enumerate(models):
        legend.plot([], [], color=f"C{k}", lw=2, label=model)
    for k, kind in enumerate(inputs):
        legend.plot([], [], color="black", ls=INPUT_STYLES[k % len(INPUT_STYLES)], label=kind)
    legend.legend(loc="center", frameon=False, fontsize=11, title="model, input")
    fig.tight_layout()
    return fig


def plot_study(study, table, label):
    """The study's figure: its per-layer values against the layer (prefix: against n), a legend in each panel."""
    fig, axes = PLOTS[study](table, label)
    for ax in axes:
        ax.legend(fontsize=7, frameon=False, loc="upper center" if study == "sink" else "best")
    fig.tight_layout()
    return fig
