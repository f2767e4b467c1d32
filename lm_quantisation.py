"""What the 4-bit rounding of a GGUF model may change, measured: its dequantised attention and MLP matrices rounded
once more with the gguf package's own quantisers, and every study rerun on the same tokens (pretrained.py
--quantisation).

    from config import QUANTISERS
    from lm_quantisation import quantisation_tables
    tables = quantisation_tables(model, tokens, QUANTISERS, studies=lambda: tables_of(model))
    # {"quantisation": a row a quantiser, "changes": per proxy and layer, "flips": per verdict and layer}
    rounded, rms = requantised_weights(model, "Q4_0")          # {parameter name: tensor}, RMS relative change
    with swapped(model, rounded): ...                          # the model with them, its own weights back after

Q8_0 is a small perturbation, Q5_0 a medium one and Q4_0 a second 4-bit rounding on another grid than the file's
(blocks of 32 along each matrix's input features, one float16 scale a block; Q4_1 and Q4_K, the files' own types,
also store a minimum). The model's output KL divergence from the file's weights compares with llama.cpp's
perplexity tool (LLaMA-3-8B against FP16: 0.0719 for Q4_0, 0.00136 for Q8_0). The verdicts compared are those a
layer has at any sample count: the combination beats its best head in most samples, fidelity synergy's sign, log
or linear growth, Theorem 2.9's bound in every sample, and each head's sink score on either side of 0.3.
"""
import contextlib

import numpy as np
import pandas as pd
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from evaluation import SINK_THRESHOLD
from hf_models import attention_modules

BLOCK = 32  # the quantisers' block along a row
# (study, column) of every proxy compared; synergy's rows are the fidelity ones
PROXIES = (("section4", "fidelity_mean"), ("section4", "fidelity_converged_mean"), ("section4", "mixing_time_mean"),
           ("tables56", "mean_combined_%"), ("tables56", "win_rate"), ("synergy", "synergy"),
           ("theorem29", "mixing"), ("theorem29", "bound"), ("prefix", "beta"), ("sink", "first_token_visible_mean"))


def rounded_matrices(model):
    """{parameter name: weight} of every attention and MLP matrix of the decoder layers: their 2-d weights (norms
    and embeddings stay)."""
    attention = {id(module) for module in attention_modules(model)}
    prefix = {name.rsplit(".", 1)[0] + "." for name, module in model.named_modules()
              if id(module) in attention}  # each decoder layer's own prefix: model.layers.3.
    return {name: weight for name, weight in model.named_parameters()
            if weight.ndim == 2 and any(name.startswith(p) for p in prefix) and name.endswith(".weight")}


def requantised_weights(model, quantiser):
    """({name: the weight quantised and dequantised by quantiser}, the RMS relative change over them all,
    ||W' - W||_F / ||W||_F with every matrix pooled)."""
    qtype = GGMLQuantizationType[quantiser]
    out, change, total = {}, 0.0, 0.0
    for name, weight in rounded_matrices(model).items():
        transposed = type(_module_of(model, name)).__name__ == "Conv1D"  # (in, out): a row is an output's column
        data = weight.detach().float().cpu().numpy()
        data = data.T if transposed else data
        if data.shape[-1] % BLOCK:
            raise ValueError(f"{name}: rows of {data.shape[-1]} features are not whole blocks of {BLOCK}")
        rounded = dequantize(quantize(np.ascontiguousarray(data), qtype), qtype)
        rounded = torch.from_numpy(np.ascontiguousarray(rounded.T if transposed else rounded))
        change += float((rounded.double() - weight.detach().double().cpu()).square().sum())
        total += float(weight.detach().double().square().sum())
        out[name] = rounded.to(weight.dtype)
    return out, float(np.sqrt(change / total))


def _module_of(model, name):
    return model.get_submodule(name.rsplit(".", 1)[0])


@contextlib.contextmanager
def swapped(model, weights):
    """The model with these weights ({name: tensor}) in place of its own, which are back afterwards."""
    parameters = dict(model.named_parameters())
    kept = {name: parameters[name].detach().clone() for name in weights}
    try:
        with torch.no_grad():
            for name, weight in weights.items():
                parameters[name].copy_(weight)
        yield model
    finally:
        with torch.no_grad():
            for name, weight in kept.items():
                parameters[name].copy_(weight)


def kl_per_token(reference_logits, logits, chunk=128):
    """Mean over positions of KL(softmax(reference) || softmax(logits)) in nats, float64, (1, T, V) -> (1,): chunk
    positions at a time (a 262,144-token vocabulary's float64 log-probabilities are 2 MiB a position)."""
    total = torch.zeros(reference_logits.shape[0], dtype=torch.float64)
    for start in range(0, reference_logits.shape[1], chunk):
        p_log = torch.log_softmax(reference_logits[:, start:start + chunk].double(), -1)
        q_log = torch.log_softmax(logits[:, start:start + chunk].double(), -1)
        total += (p_log.exp() * (p_log - q_log)).sum(-1).sum(-1)
    return total / reference_logits.shape[1]


def output_kl(model, weights, tokens):
    """(S,) the model's mean KL divergence per token from its own weights to these, on each sample of tokens."""
    out = []
    with torch.no_grad():
        for sample in tokens:
            ids = sample[None].to(model.device)
            reference = model(input_ids=ids).logits.cpu()
            with swapped(model, weights):
                out.append(float(kl_per_token(reference, model(input_ids=ids).logits.cpu())[0]))
            del reference
    return np.array(out)


def _rows(table, study):
    return table[table.proxy == "fidelity"] if study == "synergy" else table.drop_duplicates("layer")


def verdicts(tables):
    """{(verdict, layer[, head]): bool} of a model's study tables: the point verdicts named in the module doc."""
    out = {}
    checks = {"tables56": ("beats its best head in most samples", lambda r: r.win_rate > 0.5),
              "synergy": ("fidelity synergy > 0", lambda r: r.synergy > 0),
              "prefix": ("grows like log n", lambda r: r.growth == "log"),
              "theorem29": ("bound holds in every sample", lambda r: r.bound_holds_share == 1)}
    for study, (name, holds) in checks.items():
        if study in tables:
            out.update({(name, r.layer, None): bool(holds(r)) for r in _rows(tables[study], study).itertuples()})
    if "sink" in tables:  # each head's score over the queries that see position 0 is not in the table: Gu et al.'s
        heads = [c for c in tables["sink"].columns if c.startswith("head_")]
        out.update({("sink head (Gu et al.)", int(r["layer"]), h): bool(r[h] > SINK_THRESHOLD)
                    for _, r in tables["sink"].iterrows() for h in heads})
    return out


def compared(file_tables, rounded_tables):
    """(changes, flips) between two runs of the studies on the same tokens: per study, proxy and layer, both values
    and the relative change (rounded - file) / |file|; per verdict and layer (and head), both verdicts."""
    changes = []
    for study, column in PROXIES:
        if study in file_tables and column in file_tables[study]:
            ours, theirs = _rows(file_tables[study], study), _rows(rounded_tables[study], study)
            for (layer, a), b in zip(ours[["layer", column]].itertuples(index=False), theirs[column]):
                changes.append({"study": study, "proxy": column, "layer": layer, "file": a, "rounded": b,
                                "relative_change": (b - a) / abs(a) if a else np.nan})
    before, after = verdicts(file_tables), verdicts(rounded_tables)
    flips = [{"verdict": name, "layer": layer, "head": head, "file": before[key], "rounded": after[key],
              "flipped": before[key] != after[key]} for key in before for name, layer, head in [key]]
    return pd.DataFrame(changes), pd.DataFrame(flips)


def quantisation_tables(model, tokens, quantisers, *, studies):
    """{"quantisation": one row a quantiser (the weights' RMS relative change, the output KL per token over the
    samples, each proxy's median |relative change| over layers, the flips of each verdict), "changes", "flips"
    (compared, with the quantiser)} of the model; studies(): the study tables of the model as it is at the call."""
    before = studies()
    rows, changes, flips = [], [], []
    for quantiser in quantisers:
        weights, rms = requantised_weights(model, quantiser)
        kl = output_kl(model, weights, tokens)
        with swapped(model, weights):
            change, flip = compared(before, studies())
        changes.append(change.assign(quantiser=quantiser))
        flips.append(flip.assign(quantiser=quantiser))
        median = change.assign(abs_change=change.relative_change.abs()).groupby(["study", "proxy"],
                                                                                 sort=False).abs_change.median()
        counted = flip.groupby("verdict", sort=False).flipped.agg(["sum", "size"])
        rows.append({"quantiser": quantiser, "weights_rms_change": rms, "kl_mean": kl.mean(), "kl_min": kl.min(),
                     "kl_max": kl.max(), "samples": len(kl),
                     **{f"{study}.{proxy}_median_abs_change": v for (study, proxy), v in median.items()},
                     **{f"flipped.{verdict}": int(c["sum"]) for verdict, c in counted.iterrows()},
                     **{f"verdicts.{verdict}": int(c["size"]) for verdict, c in counted.iterrows()}})
    return {"quantisation": pd.DataFrame(rows), "changes": pd.concat(changes, ignore_index=True),
            "flips": pd.concat(flips, ignore_index=True)}
