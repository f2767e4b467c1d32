"""The paper's per-layer analysis on any Hugging Face causal language model (GPT-2, Pythia, Llama, Mistral, Qwen2,
Gemma 2/3), one layer at a time.

    python pretrained.py --model gpt2                       # a hub name: needs a network, or the model in the cache
    python pretrained.py --model FOLDER --input text --text FILE --length 512 --samples 8
    python pretrained.py --model FOLDER --studies section4,theorem29 --device cuda
    python pretrained.py --model FOLDER --quick             # seconds: 3 samples of 24 tokens
    python pretrained.py --model FOLDER --without-first-token   # also without position 0 (the sink)

Inputs (--input): repeat (default: random tokens followed by their copy, the language-model form of the paper's copy
task and the classic induction probe), random (uniform tokens, the paper's inputs), text (windows of --length
tokens spread evenly over a file, through the model's tokenizer). Each sample runs through the model once; every
layer's attention is handed to the studies as soon as it is computed and let go (hf_models.stream_attention), so
memory holds one layer's attention. Per layer (1-indexed), with the layer's learned head weights
(hf_models.head_weights):

    section4    mixing time (the authors' walk and the principled one) and minimax fidelity of the combination,
                at the paper's 100 steps and, certified, at convergence (fidelity_converged)
    tables56    the combination against its best single head, with a sign test over the samples
    synergy     the combination against the same heads in parallel, gain over the best head, head diversity
    theorem29   the epsilon-mixing time of the layer's walk against Theorem 2.9's bound 2N/p
    prefix      the layer on its first n = 16, 32, ... T tokens; whether its epsilon-mixing time grows like log n

Writes OUT/<model>/ (OUT: --out, default results/pretrained): tokens.csv, {study}.csv and .md, {study}.png and .pdf,
and prints a summary. Position 0 is node 0 of the DAG, as in the paper; language models put much of their attention
there (an "attention sink"): docs/pretrained.md says how that shapes each proxy.
"""
import argparse
from pathlib import Path

import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from claims import growth_table
from config import PAPER, SEED
from evaluation import (STUDIES, prefix_summary, section4_summary, synergy_summary, tables56_summary,
                        theorem29_summary)
from hf_models import (head_weights, load_causal_lm, load_tokenizer, max_positions, model_label, prefix_lengths,
                       study_values)
from script_io import check_writable, input_errors, resolve_device, save_figure, save_table, write_atomic

INPUTS = ("repeat", "random", "text")
QUICK_LENGTH, QUICK_SAMPLES = 24, 3


def input_tokens(kind, *, samples, length, vocab_size, seed, tokenizer=None, text=None):
    """(samples, length) token ids: repeat, random or text windows (evenly spaced over the file)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randint(0, vocab_size, (samples, length), generator=generator)
    if kind == "repeat":
        half = torch.randint(0, vocab_size, (samples, (length + 1) // 2), generator=generator)
        return torch.cat([half, half], dim=1)[:, :length]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"--text holds {len(ids)} tokens, fewer than --length {length}")
    starts = np.linspace(0, len(ids) - length, samples).round().astype(int)
    return torch.tensor([ids[s:s + length] for s in starts])


def study_tables(values, studies, kind, heads):
    """{study: DataFrame} of the values, the rows of the toy models' studies with task = the input kind."""
    tables = {}
    if "section4" in values:
        tables["section4"] = pd.DataFrame(section4_summary(values["section4"], kind, heads, "exact"))
    if "tables56" in studies:
        fidelity = values["head_sets"]["values"]["fidelity"]
        tables["tables56"] = pd.DataFrame(tables56_summary(kind, heads, fidelity["best_head"], fidelity["combined"]))
    if "synergy" in studies:
        tables["synergy"] = pd.DataFrame(synergy_summary(kind, heads, **values["head_sets"]))
    if "theorem29" in values:
        tables["theorem29"] = pd.DataFrame(theorem29_summary(values["theorem29"], kind, heads))
    if "prefix" in values:
        prefix = pd.DataFrame(prefix_summary(values["prefix"], kind, heads))
        growth = growth_table(prefix)[["layer", "growth"]]
        tables["prefix"] = prefix.merge(growth, on="layer")
    return tables


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
    fig, (mix, fid) = _panels(label, [("mixing time", "steps"), ("minimax fidelity", "%")])
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
    fig, (ax,) = _panels(label, [("ε-mixing time on the first n tokens", "steps")])
    for k, (layer, part) in enumerate(t.groupby("layer")):
        ax.plot(part.n, part.mixing, "o-", ms=3, color=plt.cm.viridis(k / max(1, t.layer.nunique() - 1)),
                label=f"layer {layer} ({part.growth.iloc[0]})")
    lengths = sorted(t.n.unique())
    ax.set(xscale="log", xlabel="n (tokens, log scale)")  # log n grows as a straight line, n as an exponential
    ax.set_xticks(lengths, labels=[str(n) for n in lengths], minor=False)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return fig, (ax,)


PLOTS = {"section4": plot_section4, "tables56": plot_tables56, "synergy": plot_synergy,
         "theorem29": plot_theorem29, "prefix": plot_prefix}


def plot_study(study, table, label):
    """The study's figure: its per-layer values against the layer (prefix: against n), a legend in each panel."""
    fig, axes = PLOTS[study](table, label)
    for ax in axes:
        ax.legend(fontsize=7, frameon=False, ncol=2 if study == "prefix" else 1)
    fig.tight_layout()
    return fig


def write_outputs(tables, tokens, folder, label):
    """tokens.csv, {study}.csv/.md and {study}.png/.pdf under folder."""
    ids = pd.DataFrame({"sample": range(len(tokens)), "token_ids": [" ".join(map(str, t.tolist())) for t in tokens]})
    write_atomic(folder / "tokens.csv", lambda tmp: ids.to_csv(tmp, index=False))
    for study, table in tables.items():
        save_table(table, folder / study, view=table.round(4))
        save_figure(plot_study(study, table, label), folder / study)


def summary_lines(tables):
    """A few lines a reader takes in at a glance."""
    lines = []
    if "section4" in tables:
        t = tables["section4"]
        lines.append(f"section4: mixing time {t.mixing_time_mean.min():.1f}–{t.mixing_time_mean.max():.1f} steps, "
                     f"fidelity {t.fidelity_mean.min():.3g}–{t.fidelity_mean.max():.3g}% over {len(t)} layers")
    if "tables56" in tables:
        t = tables["tables56"]
        lines.append(f"tables56: the combination beats its best head in more than half the samples in "
                     f"{int((t.win_rate > 0.5).sum())} of {len(t)} layers ({int((t.p_value < 0.05).sum())} with a "
                     f"sign test p < 0.05)")
    if "synergy" in tables:
        t = tables["synergy"][tables["synergy"].proxy == "fidelity"]
        lines.append(f"synergy: fidelity synergy > 0 in {int((t.synergy > 0).sum())} of {len(t)} layers")
    if "theorem29" in tables:
        t = tables["theorem29"]
        lines.append(f"theorem29: the bound 2N/p holds in every sample in {int((t.bound_holds_share == 1).sum())} "
                     f"of {len(t)} layers")
    if "prefix" in tables:
        growth = tables["prefix"].drop_duplicates("layer").growth
        lines.append("prefix: " + ", ".join(f"{k} {v}" for k, v in growth.value_counts().items()) + " layers")
    return lines


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Hugging Face hub name (network or cache) or a folder in "
                                                       "the save_pretrained layout")
    parser.add_argument("--input", choices=INPUTS, default="repeat", help="the token sequences (default repeat)")
    parser.add_argument("--text", type=Path, default=None, help="the text file of --input text")
    parser.add_argument("--length", type=int, default=None, help=f"tokens per sample (default 256; {QUICK_LENGTH} "
                                                                 f"with --quick)")
    parser.add_argument("--samples", type=int, default=None, help=f"samples (default 8; {QUICK_SAMPLES} with --quick)")
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, of {', '.join(STUDIES)}")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the random and repeat inputs (default {SEED})")
    parser.add_argument("--out", type=Path, default=Path("results") / "pretrained", help="output folder (default "
                        "results/pretrained); the files go to OUT/<model name>/")
    parser.add_argument("--without-first-token", action="store_true",
                        help="also the variant without position 0 (the attention sink): each query's attention to "
                             "positions 1..T-1 renormalised; written to OUT/<model>/without_first_token/")
    parser.add_argument("--quick", action="store_true", help="a few short samples: seconds on a CPU")
    return parser, parser.parse_args()


def checked(parser, args):
    """(length, samples, studies, device) from the flags, each checked."""
    length = args.length or (QUICK_LENGTH if args.quick else 256)
    samples = args.samples or (QUICK_SAMPLES if args.quick else 8)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        parser.error(f"--studies: expected a comma-separated list of {', '.join(STUDIES)}, got {args.studies!r}")
    if length < 4 or samples < 1:
        parser.error(f"--length must be at least 4 and --samples at least 1, got {length} and {samples}")
    if (args.input == "text") != (args.text is not None):
        parser.error("--text FILE goes with --input text, and --input text needs --text FILE")
    if args.text is not None and not args.text.is_file():
        parser.error(f"--text {args.text}: no such file")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    return length, samples, studies, device


def main():
    parser, args = parse_args()
    length, samples, studies, device = checked(parser, args)
    with input_errors(parser):
        model = load_causal_lm(args.model, device)
        limit = max_positions(model.config)
        if limit is not None and length > limit:
            raise ValueError(f"--length {length} is beyond the {limit} positions {args.model} was built for")
        tokenizer = load_tokenizer(args.model) if args.input == "text" else None
        text = args.text.read_text() if args.text else None
        tokens = input_tokens(args.input, samples=samples, length=length, vocab_size=model.config.vocab_size,
                              seed=args.seed, tokenizer=tokenizer, text=text)
    label = model_label(args.model)
    check_writable(parser, args.out / label)
    layers, heads = head_weights(model).shape
    print(f"{label}: {samples} {args.input} sample(s) of {length} tokens, {layers} layers, {heads} heads on {device}")
    variants = [(True, args.out / label)] + ([(False, args.out / label / "without_first_token")]
                                             if args.without_first_token else [])
    for first_token, folder in variants:
        n = length if first_token else length - 1
        with input_errors(parser):
            values = study_values(model, tokens, PAPER, studies, prefix_lengths(n), first_token=first_token)
        tables = study_tables(values, studies, args.input, heads)
        write_outputs(tables, tokens, folder, label if first_token else f"{label} without position 0")
        print(("" if first_token else "without position 0:\n") + "\n".join(summary_lines(tables)))
        print(f"wrote {folder}/tokens.csv and " + ", ".join(f"{s}.*" for s in tables))


if __name__ == "__main__":
    main()
