"""pretrained.py's CSVs against references written out here from the definitions (docs/proxies.md, docs/theory.md,
docs/pretrained.md), on a tiny random Llama: the attention from transformers' own output_attentions, the head
weights from the state_dict, every walk stepped state by state in NumPy, the statistics from their formulas (scipy's
distributions and its Wilcoxon test, never this repo's code). Every column of every study's CSV is checked."""
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, authors_walk_reference
from scipy import stats

from config import BETA_BOOTSTRAP_DRAWS, SEED

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
T, SAMPLES, HORIZON, CAP, EPSILON = 12, 5, 100, 100, 0.25


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny Llama (2 layers, 4 query heads over 2 key-value heads, head_dim 16) through pretrained.py on random
    tokens, with the variant without position 0: (model, token ids, output folder)."""
    root = tmp_path_factory.mktemp("reference")
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=37,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "llama")
    subprocess.run([sys.executable, "pretrained.py", "--model", str(root / "llama"), "--input", "random", "--length",
                    str(T), "--samples", str(SAMPLES), "--without-first-token", "--out", str(root / "out")],
                   cwd=ROOT, check=True, capture_output=True)
    folder = root / "out" / "llama" / "random"
    ids = torch.tensor([[int(x) for x in row.split()] for row in pd.read_csv(folder / "tokens.csv").token_ids])
    model = transformers.LlamaForCausalLM.from_pretrained(root / "llama", attn_implementation="eager").eval()
    return model, ids, folder


def head_weights(model):
    """Each head's 16 columns of o_proj, Frobenius norms normalised per layer."""
    out = []
    for layer in range(2):
        W = model.state_dict()[f"model.layers.{layer}.self_attn.o_proj.weight"].double().numpy()
        norms = np.array([np.sqrt((W[:, h * 16:(h + 1) * 16] ** 2).sum()) for h in range(4)])
        out.append(norms / norms.sum())
    return out


def normalized_walk(C):
    P = np.zeros_like(C)
    for c in range(len(C) - 1):
        P[c] = C[:, c] / C[:, c].sum()
    P[-1, -1] = 1.0
    return P


def capped_walk(P, cap=CAP):
    """(mean over every start of E[min(H, cap)], mean over every start of P(H >= cap)), the sink's 0 included."""
    steps, survive = [], []
    for start in range(len(P)):
        dist, total = np.eye(len(P))[start], 0.0
        for _ in range(cap):
            total += 1.0 - dist[-1]
            dist = dist @ P
        steps.append(total if start < len(P) - 1 else 0.0)
        survive.append(1.0 - dist[-1] if start < len(P) - 1 else 0.0)
    return np.mean(steps), np.mean(survive)


def sink_rows(matrices, weights, horizon):
    """phi_j = max over t = 1..horizon of sum_h w_h (A_h^t)[tau, j]: one matrix alone, or parallel channels."""
    rows = [A[-1].copy() for A in matrices]
    phi = sum(w * r for w, r in zip(weights, rows))
    for _ in range(horizon - 1):
        rows = [r @ A for r, A in zip(rows, matrices)]
        phi = np.maximum(phi, sum(w * r for w, r in zip(weights, rows)))
    return phi


def fidelity(C, horizon=HORIZON):
    return 100 * sink_rows([C], [1.0], horizon).min()


def column_walk(A):
    """W[i, j] = A[i, j] / sum_i A[i, j]: where a step from j goes."""
    return A / A.sum(0, keepdims=True)


def epsilon_mixing(W, start):
    """Published convention: the last t at which the sink's share (averaged over starts, or the worst start's) is
    still <= 1 - epsilon / 2, i.e. the first t above it less one."""
    power = np.eye(len(W))
    for t in range(1, 100_000):
        power = W @ power
        share = power[-1].mean() if start == "average" else power[-1].min()
        if share > 1 - EPSILON / 2:
            return t - 1.0
    return math.inf


def hoeffding(N, p):
    """The least integer t > N / p with 2 exp(-2 (t p - N)^2 / t) < epsilon, by search."""
    t = math.floor(N / p) + 1
    while 2 * math.exp(-2 * (t * p - N) ** 2 / t) >= EPSILON:
        t += 1
    return t


def theorem29(A, w):
    """Theorem 2.9's values of one layer's heads A (H, n, n): p, the bounds, the mixture's and heads' mixing."""
    N = A.shape[-1] - 1
    walks = [column_walk(a) for a in A]
    move = np.array([[1 - W[j, j] for j in range(N)] for W in walks])
    p_worst, p_mean = w @ move.min(1), w @ move.mean(1)
    mixture = sum(wh * W for wh, W in zip(w, walks))
    return {"p_worst": p_worst, "p_mean": p_mean, "bound": 2 * N / p_worst, "bound_mean_node": 2 * N / p_mean,
            "hoeffding_bound": hoeffding(N, p_worst), "rigorous": N * p_worst > math.log(2 / EPSILON),
            "mixing": epsilon_mixing(mixture, "average"), "mixing_worst": epsilon_mixing(mixture, "worst"),
            "fastest_head": min(epsilon_mixing(W, "average") for W in walks),
            "fastest_head_worst": min(epsilon_mixing(W, "worst") for W in walks)}


def per_sample(A, w):
    """Every per-sample value of one layer's heads A (H, T, T) with weights w."""
    C = np.tensordot(w, A, axes=1)
    heads_fidelity = [fidelity(a) for a in A]
    heads_mixing = [capped_walk(authors_walk_reference(a))[0] for a in A]
    mixing, capped = capped_walk(authors_walk_reference(C))
    normalized, normalized_capped = capped_walk(normalized_walk(C))
    rows = A[:, 1:, :]
    diversity = np.mean([0.5 * np.abs(rows[h] - rows[g]).sum(-1).mean() for h in range(4) for g in range(h + 1, 4)])
    prefix = {}
    for n in (8, A.shape[-1]):  # the first n tokens: the top-left block, under a causal mask
        block = theorem29(A[:, :n, :n], w)
        prefix[n] = {"mixing": block["mixing"], "bound": 2 * (n - 1) / block["p_worst"],
                     "mixing_time": capped_walk(authors_walk_reference(C[:n, :n]))[0], "fidelity": fidelity(C[:n, :n])}
    first = A[:, :, 0].mean(-1)
    return {"mixing_time": mixing, "fidelity": fidelity(C), "mixing_time_normalized": normalized,
            "mixing_time_capped_share": capped, "mixing_time_normalized_capped_share": normalized_capped,
            "fidelity_converged": fidelity(C, 5000),
            "fidelity_combined": fidelity(C), "fidelity_parallel": 100 * sink_rows(list(A), w, HORIZON).min(),
            "fidelity_best": max(heads_fidelity), "mixing_combined": mixing, "mixing_parallel": w @ heads_mixing,
            "mixing_best": min(heads_mixing), "diversity": diversity, "theorem29": theorem29(A, w),
            "prefix": prefix, "first_token": first}


def wilson(k, n, z=stats.norm.ppf(0.975)):
    centre, half = (k + z * z / 2) / (n + z * z), z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return centre - half, centre + half


def sign_test(wins, decided):
    if not decided:
        return 1.0
    tail = min(stats.binom.cdf(wins, decided, 0.5), stats.binom.sf(wins - 1, decided, 0.5))
    return min(1.0, 2 * tail)


def t_interval(x):
    if np.ptp(x) == 0:
        return x.mean(), x.mean()
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


def wilcoxon(x):
    """The two-sided Wilcoxon signed-rank p-value of paired differences; 1 where they are all zero."""
    return 1.0 if np.all(x == 0) else float(stats.wilcoxon(x).pvalue)


def reference_rows(values, layer):
    """{study: {column: value}} of one layer from its per-sample values (a list over samples)."""
    get = lambda key: np.array([v[key] for v in values])
    section4 = {"estimator": "exact"}
    for name in ("mixing_time", "fidelity", "mixing_time_normalized", "mixing_time_capped_share",
                 "mixing_time_normalized_capped_share", "fidelity_converged"):
        section4[f"{name}_mean"], section4[f"{name}_std"] = get(name).mean(), get(name).std()
    best, combined = get("fidelity_best"), get("fidelity_combined")
    wins, ties = int((combined > best).sum()), int((combined == best).sum())
    low, high = wilson(wins, SAMPLES)
    tables56 = {"best_individual_%": best[0], "combined_%": combined[0], "amplification": combined[0] > best[0],
                "mean_best_individual_%": best.mean(), "mean_combined_%": combined.mean(), "wins": wins, "ties": ties,
                "samples": SAMPLES, "win_rate": wins / SAMPLES, "win_ci_low": low, "win_ci_high": high,
                "p_value": sign_test(wins, SAMPLES - ties)}
    synergy = {}
    for proxy, sign in (("fidelity", 1), ("mixing", -1)):
        c, par, b = get(f"{proxy}_combined"), get(f"{proxy}_parallel"), get(f"{proxy}_best")
        lo, hi = t_interval(sign * (c - par))
        synergy[proxy] = {"combined": c.mean(), "parallel": par.mean(), "best_head": b.mean(),
                          "synergy": (sign * (c - par)).mean(), "ci_low": lo, "ci_high": hi,
                          "p_value": wilcoxon(sign * (c - par)), "gain_over_best": (sign * (c - b)).mean(),
                          "gain_over_best_p": wilcoxon(sign * (c - b)), "diversity": get("diversity").mean(),
                          "sequences": SAMPLES}
    th = [v["theorem29"] for v in values]
    tget = lambda key: np.array([x[key] for x in th], dtype=float)
    worst = tget("mixing_worst")
    theorem = {key: tget(key).mean() for key in th[0] if key != "rigorous"}
    theorem.update(rigorous_share=tget("rigorous").mean(), bound_holds_share=(worst <= tget("bound")).mean(),
                   mean_node_holds_share=(worst <= tget("bound_mean_node")).mean(),
                   hoeffding_holds_share=(worst <= tget("hoeffding_bound")).mean(), unmixed_share=0.0,
                   bound_over_measured=(tget("bound") / worst).mean())
    first = get("first_token")  # (S, H)
    sink = {"sink_share": (first.mean(0) > 0.3).mean(), "sink_share_per_sample_mean": (first > 0.3).mean(1).mean(),
            "sink_share_per_sample_std": (first > 0.3).mean(1).std(), "first_token_mean": first.mean(0).mean(),
            # a full layer: every query sees position 0, so the score over the queries that see it is Gu et al.'s
            "sink_share_visible": (first.mean(0) > 0.3).mean(), "first_token_visible_mean": first.mean(0).mean(),
            **{f"head_{h + 1}": first.mean(0)[h] for h in range(4)}}
    lengths = sorted(values[0]["prefix"])
    beta, low, high = exponent(lengths, np.array([[v["prefix"][n]["mixing"] for n in lengths] for v in values]))
    prefix = {n: {**{k: np.mean([v["prefix"][n][k] for v in values]) for k in values[0]["prefix"][n]},
                  "growth": "too few lengths", "beta": beta, "beta_low": low, "beta_high": high} for n in lengths}
    return {"section4": section4, "tables56": tables56, "synergy": synergy, "theorem29": theorem, "sink": sink,
            "prefix": prefix}


def exponent(n, per_sample, seed=SEED, draws=BETA_BOOTSTRAP_DRAWS):
    """beta, the slope of log T_mix (the mean over samples) against log n by np.polyfit, and its 95% percentile
    bootstrap interval: `draws` resamples of the samples' rows, np.random.default_rng(seed).integers(0, S, (draws, S)),
    each refitted."""
    fit = lambda means: np.polyfit(np.log(n), np.log(means), 1)[0]
    rows = np.random.default_rng(seed).integers(0, len(per_sample), (draws, len(per_sample)))
    return fit(per_sample.mean(0)), *np.percentile([fit(per_sample[r].mean(0)) for r in rows], [2.5, 97.5])


def holm(p):
    """Holm's step-down adjustment: the k-th smallest (from 0) of m p-values times m - k, at least the one before it,
    at most 1."""
    adjusted, running = [0.0] * len(p), 0.0
    for k, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        adjusted[i] = running
    return adjusted


def check(written_table, expected, keys):
    """The CSV's row of `keys` holds exactly the expected columns (besides task, heads, layer and keys), each close."""
    row = written_table
    for key, value in keys.items():
        row = row[row[key] == value]
    assert len(row) == 1, keys
    row = row.iloc[0]
    assert set(row.index) - {"task", "heads", "layer", *keys} == set(expected), (keys, set(row.index) ^ set(expected))
    for column, value in expected.items():
        assert row[column] == value if isinstance(value, (str, bool, np.bool_)) else \
            np.isclose(row[column], value, rtol=1e-9, atol=1e-12), (keys, column, row[column], value)


@pytest.mark.parametrize("variant", ["", "without_first_token"])
def test_every_column_of_every_study_against_the_definitions(written, variant):
    model, ids, folder = written
    folder = folder / variant
    with torch.no_grad():
        attention = [a.double().numpy() for a in model(input_ids=ids, output_attentions=True).attentions]
    weights = head_weights(model)
    rows = []
    for layer in range(2):
        A = attention[layer]  # (S, H, T, T)
        if variant:  # positions 1.., each row renormalised
            A = A[..., 1:, 1:] / A[..., 1:, 1:].sum(-1, keepdims=True)
        rows.append(reference_rows([per_sample(A[s], weights[layer]) for s in range(SAMPLES)], layer))
    # Holm's correction across the model's layers, per test
    for p_holm, row in zip(holm([row["tables56"]["p_value"] for row in rows]), rows):
        row["tables56"]["p_holm"] = p_holm
    for proxy in ("fidelity", "mixing"):
        for p_holm, row in zip(holm([row["synergy"][proxy]["p_value"] for row in rows]), rows):
            row["synergy"][proxy]["p_holm"] = p_holm
    for layer, row in enumerate(rows):
        number = {"layer": layer + 1}
        full = lambda expected: {**expected, "layer_kind": "full"}  # the tiny Llama has no sliding window
        check(pd.read_csv(folder / "section4.csv"), full(row["section4"]), number)
        check(pd.read_csv(folder / "tables56.csv"), full(row["tables56"]), number)
        for proxy, name in (("fidelity", "fidelity"), ("mixing", "mixing_time")):
            check(pd.read_csv(folder / "synergy.csv"), full(row["synergy"][proxy]), {**number, "proxy": name})
        check(pd.read_csv(folder / "theorem29.csv"), full(row["theorem29"]), number)
        check(pd.read_csv(folder / "sink.csv"), full(row["sink"]), number)
        for n, expected in row["prefix"].items():
            check(pd.read_csv(folder / "prefix.csv"), full(expected), {**number, "n": n})
