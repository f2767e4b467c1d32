"""The evaluation of every study: which sequences, and the per-layer rows of Section 4, Tables 5-6 and the synergy
study, with their paired statistics. Models in, rows (dicts) out; the scripts format, plot and write them.

    from evaluation import section4_rows, tables56_rows, synergy_rows
    models = {(4, "copy"): model, ...}                 # eval mode, e.g. from checkpoints.load_model
    section4_rows(models, cfg, seed)                   # mixing time and fidelity per layer, mean and std over sequences
    tables56_rows(models, cfg, samples=50, seed=seed)  # combined vs best single head, on fresh sequences
    synergy_rows(models, cfg, seed)                    # combined vs the same heads in parallel, and head diversity

Section 4 and synergy read the paper's evaluation sequences (the first of each of 50 shuffled training batches of the
seed's data); Tables 5-6 read fresh random sequences (sample 0 is the paper's one).
"""
import numpy as np
import torch
from scipy import stats

import proxies
from sequence_datasets import make_dataset

# Evaluating the same checkpoints on another CPU, GPU or torch version changes float32 attention in its last bits;
# every mean and std of a Section 4 table then agrees within this (steps, or percentage points). Measured: a 1e-6
# relative perturbation of every weight moves no value by more than 2e-5.
CROSS_MACHINE_ATOL = 1e-3
SECTION4_PROXIES = {"mixing_time": "mixing_time_mean", "fidelity": "fidelity_mean",
                    "mixing_time_normalized": "mixing_time_normalized_mean"}


def evaluation_sequences(cfg, task, seed):
    """The paper's protocol: the first sequence of each of eval_sequences shuffled training batches."""
    data = make_dataset(task, cfg.num_sequences, cfg.seq_length, cfg.vocab_size, seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    first_of_batches = order[::cfg.batch_size][:cfg.eval_sequences]
    if len(first_of_batches) < cfg.eval_sequences:
        raise ValueError(f"{cfg.eval_sequences} evaluation sequences need {cfg.eval_sequences} batches, "
                         f"but the data has only {len(first_of_batches)}")
    return data.inputs[first_of_batches]


def fresh_sequences(cfg, samples, seed):
    """Random sequences not drawn from the training set, as in the authors' test; sample 0 is the paper's one."""
    return torch.randint(0, cfg.vocab_size, (samples, cfg.seq_length), generator=torch.Generator().manual_seed(seed))


def _rows_per_task(models, cfg, seed, rows_of):
    """rows_of(model, tokens, task, heads) for every (heads, task) model, each task's on its evaluation sequences."""
    rows = []
    for task in dict.fromkeys(task for _, task in models):
        tokens = evaluation_sequences(cfg, task, seed)
        rows += [row for (heads, t), model in models.items() if t == task
                 for row in rows_of(model, tokens, task, heads)]
    return rows


# Section 4
def section4_values(model, tokens, cfg, estimator="exact", seed=0):
    """Per-sequence, per-layer proxies of the layer's learned combination of heads: dict of (S, L) arrays."""
    attn = model.attention(tokens)  # (S, L, H, T, T)
    weights = proxies.model_head_weights(model)  # (L, H), shared by every sequence
    C = proxies.combine_heads(attn, weights)[..., None, :, :]  # combined once: (S, L, 1, T, T)
    if estimator == "exact":
        mixing = proxies.mixing_time(C, max_steps=cfg.max_steps)
    else:
        mixing = proxies.mixing_time_mc(C, num_simulations=cfg.num_simulations, max_steps=cfg.max_steps, seed=seed)
    return {"mixing_time": mixing,
            "fidelity": proxies.minimax_fidelity(C, horizon=cfg.horizon),
            "mixing_time_normalized": proxies.mixing_time_normalized(C, max_steps=cfg.max_steps)}


def section4_summary(values, task, heads, estimator):
    """Rows of mean and population std (ddof 0, as the authors' code) over sequences, one per layer."""
    rows = []
    for layer in range(values["fidelity"].shape[1]):
        row = {"task": task, "heads": heads, "layer": layer + 1, "estimator": estimator}
        for name, v in values.items():
            row[f"{name}_mean"], row[f"{name}_std"] = v[:, layer].mean(), v[:, layer].std()
        rows.append(row)
    return rows


def section4_rows(models, cfg, seed, estimator="exact"):
    """section4_summary rows of every (heads, task) model, on its task's evaluation sequences for `seed`."""
    return _rows_per_task(models, cfg, seed, lambda model, tokens, task, heads: section4_summary(
        section4_values(model, tokens, cfg, estimator, seed), task, heads, estimator))


# Tables 5-6
def amplification(model, tokens, horizon):
    """Best single-head and combined minimax fidelity, (S, L) each, for S sequences."""
    attn = model.attention(tokens)  # (S, L, H, T, T)
    combined = proxies.minimax_fidelity(attn, proxies.model_head_weights(model), horizon)
    per_head = proxies.minimax_fidelity(attn[..., None, :, :], horizon=horizon)  # each head alone: (S, L, H)
    return per_head.max(axis=-1), combined


def win_statistics(combined, best):
    """Wins of the combination over the best head across samples: the win rate with its Wilson 95% interval, and
    the two-sided sign-test p-value of "combined beats the best head" (binomial, p = 1/2, ties left out)."""
    wins, ties, n = int((combined > best).sum()), int((combined == best).sum()), len(best)
    interval = stats.binomtest(wins, n).proportion_ci(confidence_level=0.95, method="wilson")
    decided = n - ties
    p_value = stats.binomtest(wins, decided, 0.5).pvalue if decided else 1.0
    return {"wins": wins, "ties": ties, "samples": n, "win_rate": wins / n, "win_ci_low": interval.low,
            "win_ci_high": interval.high, "p_value": p_value}


def tables56_summary(task, heads, best, combined):
    """One row per layer: the paper's one-sequence verdict (sample 0) and the statistics over every sample."""
    return [{"task": task, "heads": heads, "layer": layer + 1,
             "best_individual_%": best[0, layer], "combined_%": combined[0, layer],
             "amplification": bool(combined[0, layer] > best[0, layer]),
             "mean_best_individual_%": best[:, layer].mean(), "mean_combined_%": combined[:, layer].mean(),
             **win_statistics(combined[:, layer], best[:, layer])}
            for layer in range(best.shape[1])]


def tables56_rows(models, cfg, samples, seed):
    """tables56_summary rows of every (heads, task) model, on `samples` fresh sequences drawn from `seed`."""
    tokens = fresh_sequences(cfg, samples, seed)
    return [row for (heads, task), model in models.items()
            for row in tables56_summary(task, heads, *amplification(model, tokens, cfg.horizon))]


# Synergy: the combination against the same heads used as parallel channels
def head_diversity(attn):
    """Mean pairwise total-variation distance between the heads' attention rows: (..., H, T, T) -> (...)."""
    attn = torch.as_tensor(attn, dtype=torch.float64)[..., 1:, :]  # row 0 is [1, 0, ...] in every causal head
    H = attn.shape[-3]
    pairs = [(h, g) for h in range(H) for g in range(h + 1, H)]
    if not pairs:
        return np.zeros(attn.shape[:-3])
    tv = sum(0.5 * (attn[..., h, :, :] - attn[..., g, :, :]).abs().sum(-1).mean(-1) for h, g in pairs)
    return (tv / len(pairs)).cpu().numpy()


def layer_values(model, tokens, cfg):
    """Per sequence and layer (S, L): combined, parallel and best-head values of both proxies; and head diversity."""
    attn = model.attention(tokens)  # (S, L, H, T, T)
    weights = proxies.model_head_weights(model)  # (L, H)
    per_head_mixing = proxies.mixing_time(attn[..., None, :, :], max_steps=cfg.max_steps)  # (S, L, H), once
    return {
        "fidelity": {"combined": proxies.minimax_fidelity(attn, weights, cfg.horizon),
                     "parallel": proxies.parallel_minimax_fidelity(attn, weights, cfg.horizon),
                     "best_head": proxies.minimax_fidelity(attn[..., None, :, :], horizon=cfg.horizon).max(-1)},
        "mixing_time": {"combined": proxies.mixing_time(attn, weights, cfg.max_steps),
                        "parallel": proxies.head_average(per_head_mixing, weights),
                        "best_head": per_head_mixing.min(-1)},  # the best head mixes fastest
    }, head_diversity(attn)


def paired(difference):
    """Mean of paired differences, its t 95% confidence interval and the two-sided Wilcoxon signed-rank p-value;
    differences that are all equal give a zero-width interval (and p = 1 when they are all zero)."""
    mean = float(np.mean(difference))
    if np.ptp(difference) == 0:
        return mean, mean, mean, 1.0 if mean == 0 else float(stats.wilcoxon(difference).pvalue)
    interval = stats.ttest_1samp(difference, 0.0).confidence_interval(0.95)
    return mean, float(interval.low), float(interval.high), float(stats.wilcoxon(difference).pvalue)


def synergy_summary(task, heads, values, diversity):
    """One row per layer and proxy: synergy (combined against parallel) and gain over the best head, both signed so
    that positive means the combination helps, with their paired statistics; and the layer's head diversity."""
    rows = []
    for proxy, v in values.items():
        sign = 1 if proxy == "fidelity" else -1  # positive = the combination helps
        for layer in range(v["combined"].shape[1]):
            combined, parallel, best = (v[k][:, layer] for k in ("combined", "parallel", "best_head"))
            synergy, low, high, p_value = paired(sign * (combined - parallel))
            gain, _, _, gain_p = paired(sign * (combined - best))
            rows.append({"task": task, "heads": heads, "layer": layer + 1, "proxy": proxy,
                         "combined": combined.mean(), "parallel": parallel.mean(), "best_head": best.mean(),
                         "synergy": synergy, "ci_low": low, "ci_high": high, "p_value": p_value,
                         "gain_over_best": gain, "gain_over_best_p": gain_p,
                         "diversity": diversity[:, layer].mean(), "sequences": len(combined)})
    return rows


def synergy_rows(models, cfg, seed):
    """synergy_summary rows of every (heads, task) model, on its task's evaluation sequences for `seed`."""
    return _rows_per_task(models, cfg, seed, lambda model, tokens, task, heads: synergy_summary(
        task, heads, *layer_values(model, tokens, cfg)))


def correlations(table):
    """Spearman rank correlation of head diversity with synergy over all (task, heads, layer), per proxy."""
    out = {}
    for proxy, part in table.groupby("proxy", sort=False):
        result = stats.spearmanr(part.diversity, part.synergy)
        out[proxy] = (float(result.statistic), float(result.pvalue))
    return out
