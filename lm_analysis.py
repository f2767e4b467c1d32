"""The paper's per-layer analysis of a language model: its inputs (ordinary tokens, BOS first where the model expects
it), every study on each layer's streamed attention (the paper's DAG and, from the same forward pass, the DAG without
position 0), the per-sample values, the study tables and a summary a reader takes in at a glance.

    from lm_analysis import ordinary_token_ids, input_tokens, study_values, study_tables, samples_table
    vocabulary = ordinary_token_ids(tokenizer, model.config.vocab_size)
    tokens = input_tokens("repeat", samples=8, length=256, vocabulary=vocabulary, seed=42, bos=1)  # (8, 256)
    values = study_values(model, tokens, PAPER, STUDIES, layers=[0, 4], variants=(True, False))  # both DAGs
    tables = study_tables(values[True], STUDIES, "repeat", heads=9, layers=[0, 4])   # {study: DataFrame}

The studies are evaluation.layer_study_values; their rows are the toy models' (task = the input kind), numbered by
the model's own layers (1-indexed).
"""
import contextlib
import importlib
import inspect
import os
import platform
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from claims import exponent_interval, growth_table, holm, synergy_significant, wins_majority
from config import BETA_BOOTSTRAP_DRAWS, LM_LAYER_WORKERS, LM_PARALLEL_BYTES, LM_WAITING_BYTES
from evaluation import (SINK_THRESHOLD, STUDIES, layer_study_values, prefix_summary, section4_summary, sink_summary,
                        synergy_summary, tables56_summary, theorem29_summary, without_first_token)
from hf_models import (head_weights, installed_version, layer_windows, model_facts, model_name, num_heads,
                       stream_attention)
from official import sha256_of
from script_io import freed_memory_kept, intra_op_threads

INPUTS = ("repeat", "random", "one-token", "prose", "code", "text")
WORKER_NICENESS = 10
UNUSED = re.compile(r"<unused\d+>")  # Gemma's reserved rows: in the vocabulary, never trained on
# Texts every machine has without a network, so that anyone regenerates the committed results bit for bit: the GPL-3
# as Debian and Ubuntu ship it (base-files), and the source of a large module of the running Python's standard library
PROSE_FILE = Path("/usr/share/common-licenses/GPL-3")
CODE_MODULE = "argparse"


def text_file(kind, given=None):
    """The file an input reads: --text's for text, the GPL-3 for prose, the standard library's CODE_MODULE for code;
    None for the drawn inputs. ValueError where the file is missing."""
    if kind in ("prose", "code"):
        path = PROSE_FILE if kind == "prose" else Path(inspect.getsourcefile(importlib.import_module(CODE_MODULE)))
        if not path.is_file():
            raise ValueError(f"--input {kind} reads {path}, which this machine lacks (on Debian and Ubuntu it is "
                             f"part of base-files); use --input text --text FILE")
        return path
    return given if kind == "text" else None


def text_origin(kind):
    """Where an input's text comes from, as run.json records it (no path of this machine): the package or module
    that every such machine has, or --text's."""
    if kind == "prose":
        return f"base-files: {PROSE_FILE.parent.name}/{PROSE_FILE.name}"
    if kind == "code":
        return f"python {platform.python_version()} stdlib: {CODE_MODULE}.py"
    return "--text" if kind == "text" else None


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
    """(samples, length) token ids: repeat (ordinary tokens, then their copy), random (uniform over `vocabulary`),
    one-token (one drawn token, repeated) or a text's (prose, code, text: windows spread evenly from its start to
    its end, through the tokenizer); with bos, each sample is bos followed by length - 1 of them."""
    n = length - (bos is not None)
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        body = vocabulary[torch.randint(0, len(vocabulary), (samples, n), generator=generator)]
    elif kind == "one-token":
        body = vocabulary[torch.randint(0, len(vocabulary), (samples, 1), generator=generator)].expand(samples, n)
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
    """A file-system-safe name for the model's output folder: its hf_models.model_name (a packaged name, a GGUF
    file's stem, a folder's name, or the hub name), / as __."""
    return model_name(source).replace("/", "__")


def _concatenated(parts, axis):
    """Nested dicts of arrays, joined leaf by leaf along `axis`: the layers' (S, 1) into (S, L) (axis 1), the
    samples' (1, L) into (S, L) (axis 0)."""
    if isinstance(parts[0], dict):
        return {key: _concatenated([p[key] for p in parts], axis) for key in parts[0]}
    return np.concatenate([np.asarray(p) for p in parts], axis=axis)


def float64_rows(attn):
    """A half-precision model's attention in float64, each row renormalised to sum 1: bfloat16 keeps 8 bits of
    mantissa, so its rows sum to 1 only within about 1e-2, past the proxies' check (1e-4). Float32 attention as it
    is (each study reads it in float64)."""
    if attn.dtype not in (torch.float16, torch.bfloat16):
        return attn
    attn = attn.double()
    return attn / attn.sum(-1, keepdim=True)


def study_values(model, tokens, cfg, studies=STUDIES, layers=None, variants=(True,), progress=True):
    """{first_token: every study's values (evaluation.layer_study_values), (S, L) arrays over the chosen layers} for
    each variant (True: the paper's DAG; False: without position 0, evaluation.without_first_token, its prefix
    lengths counted without it), from one forward pass per sample of tokens (S, T), the layers streamed: memory holds
    the attention of one layer of one sample (on a CPU, of the layers being studied on worker threads and of those
    waiting for them beside the forward pass, bounded: layer_workers). A sliding-window layer's sink score over the
    queries that see position 0 reads its window from the config (hf_models.layer_windows). layers: 0-indexed
    (every layer when None). A bar on stderr counts samples x layers."""
    weights, windows = head_weights(model), layer_windows(model.config)
    layers = list(range(len(weights))) if layers is None else list(layers)
    T = tokens.shape[1]
    # without_first_token renormalises its rows in float64 itself, whatever the model's dtype
    reads = {True: (float64_rows, prefix_lengths(T)), False: (without_first_token, prefix_lengths(T - 1))}

    def studied(i, attn):  # every variant of one layer, in a worker
        behind_the_forward()
        return {variant: layer_study_values(reads[variant][0](attn), weights[i], cfg, studies, reads[variant][1],
                                            window=windows[i]) for variant in variants}
    workers, waiting = layer_workers(model, T)
    per_sample = {variant: [] for variant in variants}
    with (tqdm(total=len(tokens) * len(layers), desc="samples x layers", unit="layer", disable=not progress) as bar,
          freed_memory_kept() as release, intra_op_threads(1 if workers > 1 else None),
          ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool):
        # one worker: this thread itself, whose freed memory the forward pass reuses (one glibc arena), as before
        submit = pool.submit if pool else lambda function, *args: _finished(function(*args))
        for sample in tokens:
            found, running = {}, []

            def finish_oldest():
                i, future = running.pop(0)
                found[i] = future.result()
                release()
                bar.update()

            def on_layer(i, attn):
                running.append((i, submit(studied, i, attn)))
                while len(running) > waiting:  # the forward pass goes on with at most `waiting` layers handed over
                    finish_oldest()
            stream_attention(model, sample[None], on_layer, layers)
            while running:
                finish_oldest()
            for variant in variants:
                per_sample[variant].append(_concatenated([found[i][variant] for i in layers], axis=1))
    return {variant: _concatenated(parts, axis=0) for variant, parts in per_sample.items()}


def _finished(value):
    """A future that already holds value."""
    future = Future()
    future.set_result(value)
    return future


def layer_workers(model, length):
    """(workers, waiting) of study_values: on a CPU where one layer's attention at `length` tokens is at most
    LM_PARALLEL_BYTES in float64, LM_LAYER_WORKERS layers studied at once and as many layers handed over while the
    forward pass goes on as LM_WAITING_BYTES of their attention holds (at least LM_LAYER_WORKERS); else one worker
    and none waiting, the forward pass held until its layer is studied (a GPU, or a layer too large to hold twice)."""
    layer = num_heads(model.config) * length ** 2
    if model.device.type != "cpu" or layer * 8 > LM_PARALLEL_BYTES:
        return 1, 0
    return LM_LAYER_WORKERS, max(LM_LAYER_WORKERS, LM_WAITING_BYTES // (layer * model.dtype.itemsize))


def behind_the_forward():
    """Gives this thread (a study_values worker) a lower scheduling priority than the process's (its nice value plus
    WORKER_NICENESS; Linux sets it per thread), so that the forward pass, which hands the workers their layers, runs
    whenever it can, and the workers take whatever core it leaves. Nothing elsewhere."""
    if sys.platform.startswith("linux"):
        nice = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + WORKER_NICENESS)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def layer_kind(window):
    """A layer's attention as the tables name it: "full", or "sliding W" (a window of W positions)."""
    return "full" if window is None else f"sliding {window}"


def _numbered(table, layers, windows):
    """The summaries number the chosen layers 1, 2, ...: the model's own layer numbers (1-indexed) instead, each with
    its attention's kind (layer_kind) beside it."""
    table["layer"] = [layers[k - 1] + 1 for k in table.layer]
    table.insert(table.columns.get_loc("layer") + 1, "layer_kind", [layer_kind(windows[k - 1]) for k in table.layer])
    return table


def with_holm(table, by=None):
    """The table with p_holm beside p_value: Holm's adjustment across the model's layers (within each `by` group)."""
    groups = [table.index] if by is None else [part.index for _, part in table.groupby(by, sort=False)]
    table["p_holm"] = np.nan
    for rows in groups:
        table.loc[rows, "p_holm"] = holm(table.loc[rows, "p_value"])
    return table


def exponent_intervals(prefix_values, *, seed):
    """{beta_low, beta_high: (L,)}: per layer, the bootstrap interval over samples (claims.exponent_interval) of the
    exponent that claims.growth_table fits to the mean epsilon-mixing time over the samples."""
    lengths = sorted(prefix_values)
    per_sample = np.stack([np.asarray(prefix_values[n]["mixing"], dtype=float) for n in lengths], axis=-1)  # S, L, N
    intervals = [exponent_interval(lengths, per_sample[:, k], draws=BETA_BOOTSTRAP_DRAWS, seed=seed)
                 for k in range(per_sample.shape[1])]
    return {"beta_low": [low for low, _ in intervals], "beta_high": [high for _, high in intervals]}


def study_tables(values, studies, kind, heads, layers, *, windows, seed):
    """{study: DataFrame} of the values, the rows of the toy models' studies with task = the input kind, a
    layer_kind column, Holm-adjusted p-values (tables56, synergy) and the prefix study's exponent with its bootstrap
    interval (seeded by seed); layers: the 0-indexed layers the values hold; windows: every layer's window
    (hf_models.layer_windows)."""
    tables = {}
    if "section4" in values:
        tables["section4"] = pd.DataFrame(section4_summary(values["section4"], kind, heads, "exact"))
    if "tables56" in studies:
        fidelity = values["head_sets"]["values"]["fidelity"]
        tables["tables56"] = with_holm(pd.DataFrame(tables56_summary(kind, heads, fidelity["best_head"],
                                                                     fidelity["combined"])))
    if "synergy" in studies:
        tables["synergy"] = with_holm(pd.DataFrame(synergy_summary(kind, heads, **values["head_sets"])), by="proxy")
    if "theorem29" in values:
        tables["theorem29"] = pd.DataFrame(theorem29_summary(values["theorem29"], kind, heads))
    if "sink" in values:
        tables["sink"] = pd.DataFrame(sink_summary(values["sink"], kind, heads))
    if "prefix" in values:
        prefix = pd.DataFrame(prefix_summary(values["prefix"], kind, heads))
        intervals = pd.DataFrame({"layer": range(1, len(layers) + 1),
                                  **exponent_intervals(values["prefix"], seed=seed)})
        tables["prefix"] = prefix.merge(growth_table(prefix)[["layer", "growth", "beta"]], on="layer").merge(
            intervals, on="layer")
    return {study: _numbered(table, layers, windows) for study, table in tables.items()}


def _flat(values, prefix=""):
    """{dotted name: (S, L) array} of nested values: section4.fidelity, head_sets.values.fidelity.combined,
    prefix.16.mixing, sink.first_token.h1 (a per-head (S, L, H) array, one column a head), ..."""
    if not isinstance(values, dict):
        array = np.asarray(values)
        if array.ndim == 3:
            return {f"{prefix}h{h + 1}.": array[..., h] for h in range(array.shape[-1])}
        return {prefix: array}
    return {name: array for key, inner in values.items() for name, array in _flat(inner, f"{prefix}{key}.").items()}


def samples_table(values, layers, windows):
    """One row per sample and layer (the model's 1-indexed number, its layer_kind) with every per-sample value of
    every study; windows: every layer's (hf_models.layer_windows)."""
    columns = {name.rstrip("."): array for name, array in _flat(values).items()}
    S, L = next(iter(columns.values())).shape
    return pd.DataFrame({"sample": np.repeat(np.arange(S), L), "layer": np.tile(np.asarray(layers) + 1, S),
                         "layer_kind": np.tile([layer_kind(windows[k]) for k in layers], S),
                         **{name: array.reshape(-1) for name, array in columns.items()}})


def summary_counts(tables):
    """The studies' verdicts over the layers, counted as claims.py counts them: {name: value}."""
    out = {"layers": max(table.layer.nunique() for table in tables.values())}
    if "section4" in tables:
        t = tables["section4"]
        out.update(fidelity_min=t.fidelity_mean.min(), fidelity_max=t.fidelity_mean.max(),
                   mixing_time_min=t.mixing_time_mean.min(), mixing_time_max=t.mixing_time_mean.max(),
                   capped_share_max=t.mixing_time_capped_share_mean.max())
    if "tables56" in tables:
        rows = list(tables["tables56"].itertuples())
        holm_rows = [r._replace(p_value=r.p_holm) for r in rows]  # the same verdicts, Holm-adjusted
        out.update(wins=sum(wins_majority(r, +1) for r in rows),
                   losses=sum(wins_majority(r, -1) for r in rows),
                   wins_holm=sum(wins_majority(r, +1) for r in holm_rows),
                   losses_holm=sum(wins_majority(r, -1) for r in holm_rows),
                   win_rate_mean=float(np.mean([r.win_rate for r in rows])))
    if "synergy" in tables:
        rows = list(tables["synergy"][tables["synergy"].proxy == "fidelity"].itertuples())
        holm_rows = [r._replace(p_value=r.p_holm) for r in rows]
        out.update(synergy_positive=sum(synergy_significant(r, +1) for r in rows),
                   synergy_negative=sum(synergy_significant(r, -1) for r in rows),
                   synergy_positive_holm=sum(synergy_significant(r, +1) for r in holm_rows),
                   synergy_negative_holm=sum(synergy_significant(r, -1) for r in holm_rows))
    if "theorem29" in tables:
        t = tables["theorem29"]
        out.update(bound_holds=int((t.bound_holds_share == 1).sum()),
                   bound_over_measured_min=t.bound_over_measured.min(),
                   bound_over_measured_max=t.bound_over_measured.max())
    if "prefix" in tables:
        per_layer = tables["prefix"].drop_duplicates("layer")
        out.update({f"growth_{k.replace(' ', '_')}": int(v) for k, v in per_layer.growth.value_counts().items()})
        out.update(beta_median=per_layer.beta.median(), beta_min=per_layer.beta.min(), beta_max=per_layer.beta.max(),
                   beta_excludes_0=int((per_layer.beta_low > 0).sum()),
                   beta_excludes_1=int((per_layer.beta_high < 1).sum()),
                   beta_between=int(((per_layer.beta_low > 0) & (per_layer.beta_high < 1)).sum()))
    if "gradient" in tables:
        out.update(gradient_counts(tables["gradient"]))
    if "sink" in tables:
        t = tables["sink"]
        sliding = t.layer_kind.str.startswith("sliding")
        out.update(sink_share=t.sink_share.mean(), first_token_mean=t.first_token_mean.mean(),
                   sink_share_visible=t.sink_share_visible.mean(), sliding_layers=int(sliding.sum()),
                   sink_share_full=t.sink_share_visible[~sliding].mean(),
                   sink_share_sliding=t.sink_share_visible[sliding].mean())
    return out


def gradient_counts(t):
    """The gradient study's answer over j >= 1: mean rho of rollout, recency and the best layer's reach with the
    layer, rollout's gain over recency with its Wilcoxon p and the samples where it is above; rollout's and recency's
    rho over every j."""
    rows = t.set_index(["predictor", "positions"])
    reach = t[(t.positions == "after_first") & t.predictor.str.startswith("reach_")]
    best = reach.loc[reach.rho_mean.idxmax()]
    rollout = rows.loc[("rollout", "after_first")]
    return {"rho_rollout": rollout.rho_mean, "rho_recency": rows.loc[("recency", "after_first")].rho_mean,
            "rho_reach_best": best.rho_mean, "reach_best_layer": int(best.layer),
            "rollout_over_recency": rollout.over_recency, "rollout_over_recency_p": rollout.over_recency_p,
            "rollout_above_recency_samples": int(rollout.samples_over_recency),
            "gradient_samples": int(rollout.samples),
            "rho_rollout_all": rows.loc[("rollout", "all")].rho_mean,
            "rho_recency_all": rows.loc[("recency", "all")].rho_mean}


def summary_lines(tables):
    """A few lines a reader takes in at a glance (summary_counts)."""
    c, lines = summary_counts(tables), []
    layers = {study: table.layer.nunique() for study, table in tables.items()}
    if "section4" in tables:
        lines.append(f"section4: mixing time {c['mixing_time_min']:.1f}–{c['mixing_time_max']:.1f} steps (at most "
                     f"{100 * c['capped_share_max']:.1f}% of walks capped), fidelity {c['fidelity_min']:.3g}–"
                     f"{c['fidelity_max']:.3g}% over {layers['section4']} layers")
    if "tables56" in tables:
        lines.append(f"tables56: the combination beats its best head in a majority of samples (sign test p < 0.05) "
                     f"in {c['wins']} of {layers['tables56']} layers ({c['wins_holm']} after Holm's correction), "
                     f"loses to it in {c['losses']} ({c['losses_holm']})")
    if "synergy" in tables:
        lines.append(f"synergy: fidelity synergy > 0 (Wilcoxon p < 0.05) in {c['synergy_positive']} of "
                     f"{layers['synergy']} layers ({c['synergy_positive_holm']} after Holm's correction), < 0 in "
                     f"{c['synergy_negative']} ({c['synergy_negative_holm']})")
    if "theorem29" in tables:
        lines.append(f"theorem29: the bound 2N/p holds in every sample in {c['bound_holds']} of {layers['theorem29']} "
                     f"layers")
    if "prefix" in tables:
        lines.append("prefix: " + ", ".join(f"{k[7:].replace('_', ' ')} {v}" for k, v in c.items()
                                            if k.startswith("growth_")) + f" layers; exponent beta (T_mix ~ n^beta) "
                     f"{c['beta_median']:.2f} (median; {c['beta_min']:.2f} to {c['beta_max']:.2f}), its 95% interval "
                     f"above 0 in {c['beta_excludes_0']} layers, below 1 in {c['beta_excludes_1']}")
    if "gradient" in tables:
        lines.append(f"gradient: Spearman rho with the model's own sensitivity over positions 1..T-1: rollout "
                     f"{c['rho_rollout']:.3f}, recency {c['rho_recency']:.3f}, the best layer's reach "
                     f"{c['rho_reach_best']:.3f} (layer {c['reach_best_layer']}); rollout above recency in "
                     f"{c['rollout_above_recency_samples']} of {c['gradient_samples']} samples (Wilcoxon p "
                     f"{c['rollout_over_recency_p']:.2g})")
    if "sink" in tables:
        lines.append(f"sink: {100 * c['sink_share']:.1f}% of heads put more than {SINK_THRESHOLD} of their "
                     f"attention on position 0 (Gu et al.'s sink heads), mean attention there "
                     f"{c['first_token_mean']:.3f}" + (
                         f"; over the queries that see it, {100 * c['sink_share_full']:.1f}% in full layers and "
                         f"{100 * c['sink_share_sliding']:.1f}% in {c['sliding_layers']} sliding-window ones"
                         if c["sliding_layers"] else ""))
    return lines


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


def run_facts(source, model, *, bos_choice, bos, kind, text_file, length, samples, seed, layers, device_map):
    """What run.json records, with no path of this machine in it: the model, its file's name, SHA-256 and tensor
    types (and a packaged model's packages), dtype, device map, BOS, input (and its text's file name, SHA-256 and
    where it comes from), T, samples, seed, layers and the versions that made the numbers."""
    text = ({"text_file": text_file.name, "text_sha256": sha256_of(text_file),
             "text_source": text_origin(kind)} if text_file else {})
    return {**model_facts(source), "model_type": model.config.model_type, "dtype": str(model.dtype),
            "device_map": device_map, "bos": bos_choice, "bos_token_id": bos, "input": kind, **text,
            "length": length, "samples": samples, "seed": seed, "layers": [layer + 1 for layer in layers],
            "python": platform.python_version(),
            **{package: installed_version(package) for package in ("torch", "transformers", "gguf")}}


def summary_table(found, quantisation=False):
    """One row per model, input and DAG of {(model, input, first_token): tables} (summary_counts), or with
    quantisation the quantisation summaries stacked; model and input first."""
    summary = (pd.concat([t["quantisation"].assign(model=m, input=k) for (m, k, _), t in found.items()])
               if quantisation else pd.DataFrame([{"model": m, "input": k, "first_token": f, **summary_counts(t)}
                                                  for (m, k, f), t in found.items()]))
    return summary[["model", "input", *[c for c in summary.columns if c not in ("model", "input")]]]
