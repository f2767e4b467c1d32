"""The figures of the language-model studies (pretrained.py): each study's per-layer values against the layer (the
prefix study against n, as a heat map), and one figure across models and inputs.

    from lm_figures import plot_study, plot_models
    fig = plot_study("section4", tables["section4"], "smollm2, prose")     # a study's figure
    fig = plot_models({("smollm2", "prose"): tables, ...})                # per layer as a fraction of depth
"""
import matplotlib.colors
import matplotlib.ticker
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np

from evaluation import SINK_THRESHOLD


def _panels(label, panels):
    """A row of panels (title, y label) against the layer."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, ylabel) in zip(axes[0], panels):
        ax.set(title=f"{label}: {title}" if ax is axes[0, 0] else title, xlabel="layer", ylabel=ylabel)
    return fig, axes[0]


def _full_among_sliding(t):
    """The full-attention layers of a model whose other layers slide (Gemma 3's global layers); none otherwise."""
    if "layer_kind" not in t:
        return set()
    kinds = t.drop_duplicates("layer").set_index("layer").layer_kind
    sliding = kinds.str.startswith("sliding")
    return set(kinds.index[~sliding]) if sliding.any() else set()


def _mark_full_layers(axes, t):
    """A faint band at every full-attention layer of a model with sliding-window layers, named in the legend once."""
    for ax in axes:
        for k, layer in enumerate(sorted(_full_among_sliding(t))):
            ax.axvspan(layer - 0.5, layer + 0.5, color="gold", alpha=0.25, lw=0,
                       label="full-attention layer" if k == 0 else None)


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
    first n tokens, log colour scale, each row labelled with its growth; beside it, each layer's exponent beta
    (T_mix ~ n^beta) with its bootstrap 95% interval against 0 (log-like) and 1 (linear)."""
    grid = t.pivot(index="layer", columns="n", values="mixing")
    per_layer = t.drop_duplicates("layer").set_index("layer").loc[grid.index]
    fig, (ax, exponent) = plt.subplots(1, 2, figsize=(1.2 * grid.shape[1] + 7, 0.22 * grid.shape[0] + 1.6),
                                       gridspec_kw={"width_ratios": [1.2 * grid.shape[1] + 3.5, 3.5]})
    finite = grid.to_numpy()[np.isfinite(grid.to_numpy())]
    norm = matplotlib.colors.LogNorm(max(finite.min(), 1), max(finite.max(), 2)) if finite.size else None
    # cells as vector quads, not an image resampled at the figure's resolution (a PNG at 300 dpi, the PDF's raster)
    image = ax.pcolormesh(np.ma.masked_invalid(grid.to_numpy()), cmap="viridis", norm=norm)
    ax.set(xlim=(0, grid.shape[1]), ylim=(grid.shape[0], 0))
    ax.set_xticks(np.arange(grid.shape[1]) + 0.5, labels=[str(n) for n in grid.columns])
    marked = _full_among_sliding(per_layer.reset_index())
    ax.set_yticks(np.arange(grid.shape[0]) + 0.5, fontsize=6, labels=[
        f"{layer} ({per_layer.growth[layer]}){' full' if layer in marked else ''}" for layer in grid.index])
    ax.set(title=f"{label}: ε-mixing time on the first n tokens", xlabel="n (tokens)", ylabel="layer (growth)")
    bar = fig.colorbar(image, ax=ax, label="steps (log scale; blank: not mixed)")
    for axis in (bar.ax.yaxis.set_major_formatter, bar.ax.yaxis.set_minor_formatter):
        axis(matplotlib.ticker.FormatStrFormatter("%g"))  # 40, not 4 x 10^1
    rows = np.arange(grid.shape[0])
    exponent.errorbar(per_layer.beta, rows, xerr=[per_layer.beta - per_layer.beta_low,
                                                  per_layer.beta_high - per_layer.beta], fmt="o", ms=3, capsize=2)
    for x in (0, 1):
        exponent.axvline(x, color="grey", lw=0.8, ls=":")
    # named above the panel, whose rows stay those of the heat map beside it
    exponent.secondary_xaxis("top").set_xticks([0, 1], labels=["log-like", "linear"], fontsize=7, color="grey")
    exponent.set(ylim=(grid.shape[0] - 0.5, -0.5), yticks=rows, yticklabels=[],
                 title="growth exponent (bootstrap 95%)", xlabel="beta: T_mix ~ n^beta")
    return fig, ()


def plot_sink(t, label):
    """The share of sink heads per layer, and each head's mean attention to position 0 as a layer x head map."""
    heads = [c for c in t.columns if c.startswith("head_")]
    fig, (share, grid) = _panels(label, [("sink heads (Gu et al.)", "share of heads"),
                                         ("attention to position 0", "head")])
    share.plot(t.layer, t.sink_share, "o-", label=f"share of heads above {SINK_THRESHOLD} (all queries)")
    share.plot(t.layer, t.sink_share_visible, "^:", label="the same over the queries that see position 0")
    share.plot(t.layer, t.first_token_mean, "s--", label="attention to position 0, mean over heads")
    share.set_ylim(-0.03, 1.3)
    image = grid.imshow(t[heads].to_numpy().T, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest",
                        extent=(t.layer.min() - 0.5, t.layer.max() + 0.5, len(heads) + 0.5, 0.5))
    grid.set_yticks(range(1, len(heads) + 1))
    fig.colorbar(image, ax=grid, label="mean attention to position 0")
    return fig, (share,)


def plot_gradient(t, label):
    """Spearman rho of each prediction with the model's own sensitivity (mean over samples, t 95% band): each layer's
    reach against the layer, rollout and recency as lines across; over j >= 1 and over every j."""
    fig, axes = _panels(label, [("rho with the model's sensitivity, j ≥ 1", "Spearman rho"),
                                ("the same, position 0 included", "Spearman rho")])
    for ax, positions in zip(axes, ("after_first", "all")):
        part = t[t.positions == positions]
        reach = part[part.predictor.str.startswith("reach_")]
        ax.plot(reach.layer, reach.rho_mean, "o-", ms=3, label="the layer's reach (phi_j)")
        ax.fill_between(reach.layer, reach.rho_ci_low, reach.rho_ci_high, alpha=0.2, lw=0)
        for k, (predictor, name) in enumerate((("rollout", "rollout, whole model"), ("recency", "recency"))):
            row = part[part.predictor == predictor].iloc[0]
            ax.axhline(row.rho_mean, color=f"C{k + 1}", ls="--" if k == 0 else ":", label=name)
            ax.axhspan(row.rho_ci_low, row.rho_ci_high, color=f"C{k + 1}", alpha=0.15, lw=0)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
    return fig, axes


def plot_quantisation(changes, label):
    """Per layer, the relative change (%) of the fidelity, the mixing time and the epsilon-mixing time when the
    weights are rounded once more, a line a quantiser."""
    panels = [("section4", "fidelity_mean", "minimax fidelity"), ("section4", "mixing_time_mean", "mixing time"),
              ("theorem29", "mixing", "ε-mixing time")]
    fig, axes = _panels(f"{label}, re-rounded", [(title, "relative change (%)") for *_, title in panels])
    for ax, (study, proxy, _) in zip(axes, panels):
        part = changes[(changes.study == study) & (changes.proxy == proxy)]
        for k, (quantiser, rows) in enumerate(part.groupby("quantiser", sort=False)):
            ax.plot(rows.layer, 100 * rows.relative_change, "o-", ms=3, color=f"C{k}", label=quantiser)
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


PLOTS = {"section4": plot_section4, "tables56": plot_tables56, "synergy": plot_synergy,
         "theorem29": plot_theorem29, "prefix": plot_prefix, "sink": plot_sink,
         "gradient": plot_gradient}
MODEL_PANELS = [("minimax fidelity (%, log)", "section4", "fidelity_mean", None),
                ("mixing time (steps)", "section4", "mixing_time_mean", None),
                ("samples where the combination\nbeats its best head (Wilson 95%)", "tables56", "win_rate",
                 ("win_ci_low", "win_ci_high")),
                ("fidelity synergy, combined − parallel\n(pp, t 95%)", "synergy", "synergy", ("ci_low", "ci_high")),
                (f"sink heads (attention to position 0 > {SINK_THRESHOLD},\nover the queries that see it)", "sink",
                 "sink_share_visible", None),
                ("growth exponent beta of the ε-mixing time\n(T_mix ~ n^beta, bootstrap 95%)", "prefix", "beta",
                 ("beta_low", "beta_high"))]
INPUT_STYLES = ["-", "--", ":", "-."]  # plot_models' line style of each input, in turn


def plot_models(found):
    """One figure across models and inputs, found {(model, input): tables}: per layer as a fraction of depth, the
    fidelity, mixing time, win share against the best head, fidelity synergy, sink share and growth exponent; a
    colour a model, a line style an input, intervals as bands, full-attention layers among sliding ones marked."""
    fig, axes = plt.subplots(2, 3, figsize=(16.5, 7.5))
    models = list(dict.fromkeys(model for model, _ in found))
    inputs = list(dict.fromkeys(kind for _, kind in found))
    for ax, (title, study, column, band) in zip(axes.flat, MODEL_PANELS):
        for (model, kind), tables in found.items():
            t = tables[study][tables[study].proxy == "fidelity"] if study == "synergy" else (
                tables[study].drop_duplicates("layer"))
            depth = t.layer / t.layer.max()
            style = dict(color=f"C{models.index(model)}", ls=INPUT_STYLES[inputs.index(kind) % len(INPUT_STYLES)])
            ax.plot(depth, t[column], marker="o", ms=2.5, lw=1.2, **style)
            full = t.layer.isin(_full_among_sliding(t))  # a model's global layers among its sliding ones
            ax.plot(depth[full], t[column][full], "D", ms=5, mfc="none", color=style["color"], ls="none")
            if band:
                ax.fill_between(depth, t[band[0]], t[band[1]], color=style["color"], alpha=0.12, lw=0)
        ax.set(title=title, xlabel="layer / depth")
        if study == "section4" and column == "fidelity_mean":
            ax.set_yscale("log")
        if study in ("tables56", "synergy"):
            ax.axhline(0.5 if study == "tables56" else 0.0, color="grey", lw=0.8, ls=":")
        if study == "prefix":
            for level in (0, 1):  # log-like, linear
                ax.axhline(level, color="grey", lw=0.8, ls=":")
    handles = ([Line2D([], [], color=f"C{k}", lw=2, label=model) for k, model in enumerate(models)]
               + [Line2D([], [], color="black", ls=INPUT_STYLES[k % len(INPUT_STYLES)], label=kind)
                  for k, kind in enumerate(inputs)]
               + [Line2D([], [], marker="D", ms=5, mfc="none", color="black", ls="none",
                         label="full-attention layer\n(among sliding ones)")])
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend(handles=handles, loc="center right", frameon=False, fontsize=11, title="model, input")
    return fig


def plot_study(study, table, label):
    """The study's figure: its per-layer values against the layer (prefix: against n), a legend in each panel."""
    fig, axes = PLOTS[study](table, label)
    if study != "prefix":  # the prefix heat map names its full layers in its labels
        _mark_full_layers(axes, table)
    for ax in axes:
        ax.legend(fontsize=7, frameon=False, loc="upper center" if study == "sink" else "best")
    fig.tight_layout()
    return fig
