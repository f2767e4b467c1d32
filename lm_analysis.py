"""The paper's per-layer analysis of a language model: its inputs (ordinary tokens, BOS first where the model expects
it), every study on each layer's streamed attention (the paper's DAG and, from the same forward pass, the DAG without
position 0), the per-sample values, the study tables and a summary a reader takes in at a glance.

    from lm_analysis import ordinary_token_ids, input_tokens, study_values, study_tables, samples_table
    vocabulary = ordinary_token_ids(tokenizer, model.config.vocab_size)
    tokens = input_tokens("repeat", samples=8, length=256, vocabulary=vocabulary, seed=42, bos=1)  # (8, 256)
    values = study_values(model, tokens, PAPER, STUDIES, layers=[0, 4])     # {True: ..., False: ...} per variant
    tables = study_tables(values[True], STUDIES, "repeat", heads=9, layers=[0, 4])   # {study: DataFrame}

The studies are evaluation.layer_study_values; their rows are the toy models' (task = the input kind), numbered by
the model's own layers (1-indexed).
"""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from claims import growth_table, synergy_significant, wins_majority
from evaluation import (STUDIES, layer_study_values, prefix_summary, section4_summary, synergy_summary,
                        tables56_summary, theorem29_summary, without_first_token)
from hf_models import PACKAGED, head_weights, stream_attention

INPUTS = ("repeat", "random", "text")
UNUSED = re.compile(r"<unused\d+>")  # Gemma's reserved rows: in the vocabulary, never trained on


def ordinary_token_ids(tokenizer, vocab_size):
    """The ids random and repeat inputs draw from, ascending: below both the tokenizer's length and the embedding's
    rows (vocab_size may be padded beyond the tokenizer), no special or added token, no <unused...> row. Without a
    tokenizer, every id below vocab_size."""
    if tokenizer is None:
        return torch.arange(vocab_size)
    limit = min(len(tokenizer), vocab_size)
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    names = tokenizer.convert_ids_to_tokens(list(range(limit)))
    ids = [i for i, name in enumerate(names) if i not in excluded and not UNUSED.fullmatch(name or "")]
    if not ids:
        raise ValueError("the tokenizer has no ordinary token to draw random inputs from")
    return torch.tensor(ids)


def input_tokens(kind, *, samples, length, vocabulary, seed, bos=None, tokenizer=None, text=None):
    """(samples, length) token ids: repeat (ordinary tokens, then their copy), random (uniform over `vocabulary`) or
    text (windows spread evenly from the file's start to its end, through the tokenizer); with bos, each sample is
    bos followed by length - 1 of them."""
    n = length - (bos is not None)
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        body = vocabulary[torch.randint(0, len(vocabulary), (samples, n), generator=generator)]
    elif kind == "repeat":
        half = vocabulary[torch.randint(0, len(vocabulary), (samples, (n + 1) // 2), generator=generator)]
        body = torch.cat([half, half], dim=1)[:, :n]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < n:
            raise ValueError(f"--text holds {len(ids)} tokens, fewer than the {n} a sample of --length {length} "
                             f"takes from it")
        starts = np.linspace(0, len(ids) - n, samples).round().astype(int)
        body = torch.tensor([ids[s:s + n] for s in starts])
    return body if bos is None else torch.cat([torch.full((samples, 1), bos), body], dim=1)


def prefix_lengths(length):
    """The prefix study's lengths: 16, 32, 64, ... below `length`, then `length` itself (from 8 for inputs of at most
    16 tokens)."""
    first = 16 if length > 16 else 8
    return sorted({n for n in (first * 2 ** k for k in range(20)) if n < length} | {length})


def model_label(source):
    """A file-system-safe name for the model's output folder: a packaged name as it is, a GGUF file's stem, a
    folder's name, or the hub name with / as __."""
    if source.name in PACKAGED:
        return source.name
    if source.gguf_file:
        return Path(source.gguf_file).stem
    path = Path(source.path)
    return path.resolve().name if path.exists() else source.name.replace("/", "__")


def _concatenated(parts, axis):
    """Nested dicts of arrays, joined leaf by leaf along `axis`: the layers' (S, 1) into (S, L) (axis 1), the
    samples' (1, L) into (S, L) (axis 0)."""
    if isinstance(parts[0], dict):
        return {key: _concatenated([p[key] for p in parts], axis) for key in parts[0]}
    return np.concatenate([np.asarray(p) for p in parts], axis=axis)


def study_values(model, tokens, cfg, studies=STUDIES, layers=None, variants=(True,), progress=True):
    """{first_token: every study's values (evaluation.layer_study_values), (S, L) arrays over the chosen layers} for
    each variant (True: the paper's DAG; False: without position 0, evaluation.without_first_token, its prefix
    lengths counted without it), from one forward pass per sample of tokens (S, T), the layers streamed: memory holds
    one layer's attention of one sample. layers: 0-indexed (every layer when None). A bar on stderr counts samples x
    layers."""
    weights = head_weights(model)
    layers = list(range(len(weights))) if layers is None else list(layers)
    T = tokens.shape[1]
    reads = {True: (lambda attn: attn, prefix_lengths(T)), False: (without_first_token, prefix_lengths(T - 1))}
    per_sample = {variant: [] for variant in variants}
    with tqdm(total=len(tokens) * len(layers), desc="samples x layers", unit="layer", disable=not progress) as bar:
        for sample in tokens:
            found = {variant: [] for variant in variants}

            def on_layer(i, attn):
                for variant in variants:
                    read, lengths = reads[variant]
                    found[variant].append(layer_study_values(read(attn), weights[i], cfg, studies, lengths))
                bar.update()
            stream_attention(model, sample[None], on_layer, layers)
            for variant in variants:
                per_sample[variant].append(_concatenated(found[variant], axis=1))
    return {variant: _concatenated(parts, axis=0) for variant, parts in per_sample.items()}


def _numbered(table, layers):
    """The summaries number the chosen layers 1, 2, ...: the model's own layer numbers (1-indexed) instead."""
    table["layer"] = [layers[k - 1] + 1 for k in table.layer]
    return table


def study_tables(values, studies, kind, heads, layers):
    """{study: DataFrame} of the values, the rows of the toy models' studies with task = the input kind; layers: the
    0-indexed layers the values hold."""
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
        prefix = _numbered(pd.DataFrame(prefix_summary(values["prefix"], kind, heads)), layers)
        tables["prefix"] = prefix.merge(growth_table(prefix)[["layer", "growth"]], on="layer")
    return {study: table if study == "prefix" else _numbered(table, layers) for study, table in tables.items()}


def _flat(values, prefix=""):
    """{dotted name: (S, L) array} of nested values: section4.fidelity, head_sets.values.fidelity.combined,
    prefix.16.mixing, ..."""
    if not isinstance(values, dict):
        return {prefix: np.asarray(values)}
    return {name: array for key, inner in values.items() for name, array in _flat(inner, f"{prefix}{key}.").items()}


def samples_table(values, layers):
    """One row per sample and layer (the model's 1-indexed number) with every per-sample value of every study."""
    columns = {name.rstrip("."): array for name, array in _flat(values).items()}
    S, L = next(iter(columns.values())).shape
    return pd.DataFrame({"sample": np.repeat(np.arange(S), L), "layer": np.tile(np.asarray(layers) + 1, S),
                         **{name: array.reshape(-1) for name, array in columns.items()}})


def summary_lines(tables):
    """A few lines a reader takes in at a glance; wins and synergy as claims.py counts them."""
    lines = []
    if "section4" in tables:
        t = tables["section4"]
        lines.append(f"section4: mixing time {t.mixing_time_mean.min():.1f}–{t.mixing_time_mean.max():.1f} steps, "
                     f"fidelity {t.fidelity_mean.min():.3g}–{t.fidelity_mean.max():.3g}% over {len(t)} layers")
    if "tables56" in tables:
        rows = list(tables["tables56"].itertuples())
        lines.append(f"tables56: the combination beats its best head in a majority of samples (sign test p < 0.05) "
                     f"in {sum(wins_majority(r, +1) for r in rows)} of {len(rows)} layers, loses to it in "
                     f"{sum(wins_majority(r, -1) for r in rows)}")
    if "synergy" in tables:
        rows = list(tables["synergy"][tables["synergy"].proxy == "fidelity"].itertuples())
        positive, negative = (sum(synergy_significant(r, sign) for r in rows) for sign in (+1, -1))
        lines.append(f"synergy: fidelity synergy > 0 (Wilcoxon p < 0.05) in {positive} of {len(rows)} layers, "
                     f"< 0 in {negative}")
    if "theorem29" in tables:
        t = tables["theorem29"]
        lines.append(f"theorem29: the bound 2N/p holds in every sample in {int((t.bound_holds_share == 1).sum())} "
                     f"of {len(t)} layers")
    if "prefix" in tables:
        growth = tables["prefix"].drop_duplicates("layer").growth
        lines.append("prefix: " + ", ".join(f"{k} {v}" for k, v in growth.value_counts().items()) + " layers")
    return lines
