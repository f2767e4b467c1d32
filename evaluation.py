"""The evaluation of every study: which sequences, and the per-layer rows of Section 4, Tables 5-6 and the synergy
study, with their paired statistics. Models in, rows (dicts) out; the scripts format, plot and write them.

    from evaluation import section4_rows, tables56_rows, synergy_rows, theory_rows
    models = {(4, "copy"): model, ...}                 # eval mode, e.g. from checkpoints.load_model
    section4_rows(models, cfg, seed)                   # mixing time and fidelity per layer, mean and std over sequences
    tables56_rows(models, cfg, samples=50, seed=seed)  # combined vs best single head, on fresh sequences
    synergy_rows(models, cfg, seed)                    # combined vs the same heads in parallel, and head diversity
    theory_rows(models, cfg, seed)                     # Theorem 2.9 per layer, and the layers at every prefix length

Section 4, synergy and theory read the paper's evaluation sequences (the first of each of 50 shuffled training
batches of the seed's data); Tables 5-6 read fresh random sequences (sample 0 is the paper's one).
"""
import numpy as np
import torch
from scipy import stats

import proxies
import walks
from sequence_datasets import make_dataset

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


def rows_per_task(models, cfg, seed, rows_of):
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
    return attention_section4_values(model.attention(tokens), proxies.model_head_weights(model), cfg, estimator, seed)


def attention_section4_values(attn, weights, cfg, estimator="exact", seed=0, capped_shares=False):
    """section4_values of attention (S, L, H, T, T) with head weights (L, H), shared by every sequence; with
    capped_shares (exact estimator), also each walk's share stopped by the cap (proxies.mixing_and_capped_share),
    from the same pass, as mixing_time_capped_share and mixing_time_normalized_capped_share."""
    C = proxies.combine_heads(attn, weights)[..., None, :, :]  # combined once: (S, L, 1, T, T)
    if capped_shares:
        return section4_columns(section4_walk_values(C, cfg), proxies.minimax_fidelity(C, horizon=cfg.horizon))
    mixing = (proxies.mixing_time(C, max_steps=cfg.max_steps) if estimator == "exact" else
              proxies.mixing_time_mc(C, num_simulations=cfg.num_simulations, max_steps=cfg.max_steps, seed=seed))
    return {"mixing_time": mixing, "fidelity": proxies.minimax_fidelity(C, horizon=cfg.horizon),
            "mixing_time_normalized": proxies.mixing_time_normalized(C, max_steps=cfg.max_steps)}


def section4_walk_values(C, cfg):
    """The walks' part of section4_values with capped shares, of combined heads C (..., 1, T, T): mixing_time,
    mixing_time_normalized and the share of each walk's walks that the cap stops (proxies.mixing_and_capped_share),
    from one pass each."""
    (mixing, capped), (normalized, normalized_capped) = (
        proxies.mixing_and_capped_share(C, max_steps=cfg.max_steps, walk=walk) for walk in ("authors", "normalized"))
    return {"mixing_time": mixing, "mixing_time_normalized": normalized, "mixing_time_capped_share": capped,
            "mixing_time_normalized_capped_share": normalized_capped}


def section4_columns(walked, fidelity):
    """section4's values in the order of its columns (the toy models'): section4_walk_values' mixing time, the
    fidelity, then the rest of them."""
    return {"mixing_time": walked["mixing_time"], "fidelity": fidelity,
            **{name: value for name, value in walked.items() if name != "mixing_time"}}


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
    return rows_per_task(models, cfg, seed, lambda model, tokens, task, heads: section4_summary(
        section4_values(model, tokens, cfg, estimator, seed), task, heads, estimator))


# Tables 5-6
def amplification(model, tokens, horizon):
    """Best single-head and combined minimax fidelity, (S, L) each, for S sequences."""
    attn = model.attention(tokens)  # (S, L, H, T, T)
    combined = proxies.minimax_fidelity(attn, proxies.model_head_weights(model), horizon)
    per_head = proxies.minimax_fidelity(attn[..., None, :, :], horizon=horizon)  # each head alone: (S, L, H)
    return per_head.max(axis=-1), combined


def wilson_interval(successes, trials, confidence=0.95):
    """The Wilson score interval (low, high) of a binomial proportion (scipy.stats)."""
    interval = stats.binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def win_statistics(combined, best):
    """Wins of the combination over the best head across samples: the win rate with its Wilson 95% interval, and
    the two-sided sign-test p-value of "combined beats the best head" (binomial, p = 1/2, ties left out)."""
    wins, ties, n = int((combined > best).sum()), int((combined == best).sum()), len(best)
    low, high = wilson_interval(wins, n)
    decided = n - ties
    p_value = stats.binomtest(wins, decided, 0.5).pvalue if decided else 1.0
    return {"wins": wins, "ties": ties, "samples": n, "win_rate": wins / n, "win_ci_low": low, "win_ci_high": high,
            "p_value": p_value}


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
DIVERSITY_ROWS = 128  # query rows compared a pass: rows i < i1 of a causal head are zero past key i1 - 1


def head_diversity(attn):
    """Mean pairwise total-variation distance between the heads' attention rows: (..., H, T, T) -> (...). The query
    rows a DIVERSITY_ROWS at a time, each pass over the keys its rows can see (a causal head is zero beyond them):
    on a language model's 1,024 tokens, less than half the work of comparing whole rows, and each pair of heads
    compared once (_mean_pair_distance); one pass where T <= DIVERSITY_ROWS (the toy models' T = 100), by cdist as
    before (the same bits)."""
    attn = torch.as_tensor(attn, dtype=torch.float64)
    H, T = attn.shape[-3], attn.shape[-1]
    if H < 2:
        return np.zeros(attn.shape[:-3])
    pairs = torch.triu_indices(H, H, 1)
    tv = []
    for first in range(1, T, DIVERSITY_ROWS):  # row 0 is [1, 0, ...] in every causal head
        end = min(T, first + DIVERSITY_ROWS)
        keys = T if end == T or bool(attn[..., first:end, end:].any()) else end  # the whole row if not causal
        if T > DIVERSITY_ROWS:
            tv.append(_mean_pair_distance(attn[..., first:end, :keys], pairs))
            continue
        rows = attn[..., first:end, :keys].movedim(-3, -2).reshape(-1, H, keys)  # one (H, H) L1 table a query
        tv.append((0.5 * torch.cdist(rows, rows, p=1)[:, pairs[0], pairs[1]].mean(-1)).reshape(attn.shape[:-3] + (-1,)))
    return torch.cat(tv, dim=-1).mean(-1).cpu().numpy()


def _mean_pair_distance(rows, pairs):
    """The mean over pairs (2, P) of heads of the total-variation distance between their rows (..., H, r, keys):
    (..., r). Each pair once, not both ways and each head with itself as cdist's (H, H) table: a third of its time
    on a language model's layer, equal within 1e-15."""
    total = sum((rows[..., a, :, :] - rows[..., b, :, :]).abs_().sum(-1) for a, b in pairs.T.tolist())
    return 0.5 * total / pairs.shape[1]


def head_set_values(attn, weights, cfg, epsilon_mixing=False, combined_mixing=None, combined=None):
    """Per head set of a batch (..., H, T, T) with head weights (uniform when None): the combined, parallel and
    best-head values of both proxies (dicts of (...) arrays) and head diversity; with epsilon_mixing, also the
    averaged-start epsilon-mixing time of the layer's walk (walks.mixture_walk) and of its fastest head.
    combined_mixing, combined: the combination's mixing time and C (..., T, T) where the caller has them already."""
    fidelity = proxies.head_set_fidelities(attn, weights, cfg.horizon, combined)
    per_head_mixing = proxies.mixing_time(attn[..., None, :, :], max_steps=cfg.max_steps)  # (..., H), once
    if combined_mixing is None:
        combined_mixing = proxies.mixing_time(attn, weights, cfg.max_steps)
    values = {
        "fidelity": {"combined": fidelity["combined"], "parallel": fidelity["parallel"],
                     "best_head": fidelity["heads"].max(-1)},
        "mixing_time": {"combined": combined_mixing,
                        "parallel": proxies.head_average(per_head_mixing, weights),
                        "best_head": per_head_mixing.min(-1)},  # the best head mixes fastest
    }
    if epsilon_mixing:  # the heads' walks and the layer's in one batch (..., H + 1, T, T)
        per_head = walks.head_walks(attn)
        per_head = torch.cat([per_head, walks.mix_walks(per_head, weights)[..., None, :, :]], dim=-3)
        times = walks.epsilon_mixing_time(per_head, validate=False)
        values["epsilon_mixing_time"] = {"combined": times[..., -1], "best_head": times[..., :-1].min(-1)}
    return values, head_diversity(attn)


def layer_values(model, tokens, cfg):
    """Per sequence and layer (S, L) of a model: head_set_values of its attention with its learned head weights."""
    return head_set_values(model.attention(tokens), proxies.model_head_weights(model), cfg)


def t_interval(values):
    """Mean of per-sample values and its t 95% confidence interval; values that are all equal (one value included)
    give a zero-width interval."""
    mean = float(np.mean(values))
    if np.ptp(values) == 0:
        return mean, mean, mean
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    return mean, float(interval.low), float(interval.high)


def paired(difference):
    """Mean of paired differences, its t 95% confidence interval (t_interval) and the two-sided Wilcoxon signed-rank
    p-value (1 when the differences are all zero)."""
    mean, low, high = t_interval(difference)
    if np.ptp(difference) == 0 and mean == 0:
        return mean, low, high, 1.0
    return mean, low, high, float(stats.wilcoxon(difference).pvalue)


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
    return rows_per_task(models, cfg, seed, lambda model, tokens, task, heads: synergy_summary(
        task, heads, *layer_values(model, tokens, cfg)))


def correlations(table):
    """Spearman rank correlation of head diversity with synergy over all (task, heads, layer), per proxy."""
    out = {}
    for proxy, part in table.groupby("proxy", sort=False):
        result = stats.spearmanr(part.diversity, part.synergy)
        out[proxy] = (float(result.statistic), float(result.pvalue))
    return out


# Theorem 2.9: the epsilon-mixing time of each layer's walk (walks.mixture_walk) against the bound 2N/p
def _theorem29_p(move, weights):
    """p = sum_h w_h p_h per sequence and layer, p_h from each head's move probabilities (S, L, H, T - 1)
    (walks.move_probabilities of its walk): its worst node's probability of stepping toward the sink (what the
    rigorous bound needs) and its mean node's (a heuristic)."""
    return proxies.head_average(move.min(-1), weights), proxies.head_average(move.mean(-1), weights)


def theorem29_values(attn, weights, epsilon=walks.EPSILON):
    """Per sequence and layer (S, L) of attention (S, L, H, T, T) with head weights (L, H): Theorem 2.9's p (each
    head's worst node's and, as a heuristic, its mean node's probability of stepping toward the sink, weighted by
    the head weights), the bound 2N/p of both, the rigorous Hoeffding bound, whether N p > ln(2/epsilon) (where
    2N/p is rigorous), and the measured epsilon-mixing times of the layer's walk and of its fastest head."""
    measured = walks.layer_walk_mixing(attn, weights, epsilon)  # every walk of the layer, one pass
    p_worst, p_mean = _theorem29_p(measured["move"], weights)
    N = attn.shape[-1] - 1
    mixture, heads = measured["mixture"], measured["fastest_head"]  # (S, L) each
    return {"p_worst": p_worst, "p_mean": p_mean, "bound": _bound(N, p_worst), "bound_mean_node": _bound(N, p_mean),
            "hoeffding_bound": walks.hoeffding_mixing_bound(N + 1, p_worst, epsilon),
            "rigorous": N * p_worst > np.log(2 / epsilon),
            "mixing": mixture["average"], "mixing_worst": mixture["worst"],
            "fastest_head": heads["average"], "fastest_head_worst": heads["worst"]}


def _bound(N, p):
    """2N/p, inf where p = 0 (a head that never moves: the bound says nothing)."""
    with np.errstate(divide="ignore"):
        return np.where(p > 0, 2 * N / p, np.inf)


def _holds_share(measured, bound):
    """The share of sequences in which measured <= bound, among those where it can be told: a walk not mixed within
    walks.MAX_WALK_STEPS against a larger (finite) bound cannot. NaN if none can."""
    told = np.isfinite(measured) | ~np.isfinite(bound) | (bound < walks.MAX_WALK_STEPS)
    return float(np.mean((measured <= bound)[told])) if told.any() else float("nan")


def theorem29_summary(values, task, heads):
    """One row per layer: the means over sequences (inf where some sequence's walk never mixed within the cap), the
    share of sequences in which each bound holds against the worst-start mixing time (of those where it can be told)
    and the mean ratio of 2N/p to that measurement (over the sequences whose walk mixed)."""
    rows = []
    for layer in range(values["mixing"].shape[1]):
        v = {name: x[:, layer] for name, x in values.items()}
        worst = v["mixing_worst"]
        mixed = np.isfinite(worst)  # the ratio over the sequences whose walk mixed
        ratio = float(np.mean(v["bound"][mixed] / worst[mixed])) if mixed.any() else float("nan")
        rows.append({"task": task, "heads": heads, "layer": layer + 1,
                     **{name: float(np.mean(x)) for name, x in v.items() if name != "rigorous"},
                     "rigorous_share": float(np.mean(v["rigorous"])),
                     "bound_holds_share": _holds_share(worst, v["bound"]),
                     "mean_node_holds_share": _holds_share(worst, v["bound_mean_node"]),
                     "hoeffding_holds_share": _holds_share(worst, v["hoeffding_bound"]),
                     "unmixed_share": float(np.mean(~np.isfinite(worst))), "bound_over_measured": ratio})
    return rows


# Mixing across sequence length: under a causal mask the first n tokens' attention is the top-left n x n block
def prefix_values(attn, weights, lengths, cfg, whole=None, combined=None):
    """For each prefix length n: per sequence and layer (S, L), the epsilon-mixing time of the layer's walk on the
    first n tokens, the bound 2(n - 1)/p there, and the paper's two proxies of the block. whole: the values at
    n = T where the caller has them already (theorem29's and section4's, the same computations); combined: the
    layer's combined heads C (S, L, 1, T, T) where the caller has them (the block's are C's top-left block)."""
    out = {}
    C = proxies.combine_heads(attn, weights)[..., None, :, :] if combined is None else combined
    for n in lengths:
        if whole is not None and n == attn.shape[-1]:
            out[n] = whole
            continue
        measured = walks.layer_walk_mixing(attn[..., :n, :n], weights, starts=("average",), fastest_head=False)
        p_worst, _ = _theorem29_p(measured["move"], weights)
        out[n] = {"mixing": measured["mixture"]["average"],
                  "bound": _bound(n - 1, p_worst),
                  "mixing_time": proxies.mixing_time(C[..., :n, :n], max_steps=cfg.max_steps),
                  "fidelity": proxies.minimax_fidelity(C[..., :n, :n], horizon=cfg.horizon)}
    return out


def prefix_summary(values, task, heads):
    """One row per layer and prefix length: the means over sequences."""
    return [{"task": task, "heads": heads, "layer": layer + 1, "n": n,
             **{name: float(np.mean(x[:, layer])) for name, x in v.items()}}
            for layer in range(next(iter(values.values()))["mixing"].shape[1]) for n, v in values.items()]


def _theory_rows_of(model, tokens, task, heads, cfg):
    """("theorem29", row) and ("prefix", row) pairs of one model, its attention computed once."""
    with torch.no_grad():  # float64 once, not per use
        attn, weights = model.attention(tokens).double(), proxies.model_head_weights(model)
    return ([("theorem29", row) for row in theorem29_summary(theorem29_values(attn, weights), task, heads)]
            + [("prefix", row) for row in prefix_summary(prefix_values(attn, weights, cfg.prefix_lengths, cfg),
                                                           task, heads)])


def theory_rows(models, cfg, seed):
    """{"theorem29": theorem29_summary rows, "prefix": prefix_summary rows at cfg.prefix_lengths} of every
    (heads, task) model, on its task's evaluation sequences for `seed`."""
    tagged = rows_per_task(models, cfg, seed, lambda model, tokens, task, heads: _theory_rows_of(
        model, tokens, task, heads, cfg))
    return {table: [row for tag, row in tagged if tag == table] for table in ("theorem29", "prefix")}


# Any model's layer (pretrained.py): every study's per-sequence values from one layer's attention
STUDIES = ("section4", "tables56", "synergy", "theorem29", "prefix", "sink")
# Gu et al., "When Attention Sink Emerges in Language Models" (ICLR 2025): a head is a sink head when its mean
# attention to the first token, over all queries, exceeds this
SINK_THRESHOLD = 0.3


def sink_values(attn, window=None):
    """Gu et al.'s sink metric of one layer's attention (S, H, T, T): each head's attention to position 0 averaged
    over all T queries (their importance score of the first token), and over the queries that can see position 0
    (i < window in a sliding-window layer, whose later queries cannot: Gu et al.'s score is capped near window / T
    there; every query in a full layer, window None, where the two are one). {"first_token", "first_token_visible":
    (S, H), "share", "share_visible": (S,) the share of heads above SINK_THRESHOLD}."""
    first = torch.as_tensor(attn).double()[..., :, 0]  # (S, H, T)
    visible = first[..., :window] if window is not None else first
    out = {}
    for name, scores in (("", first.mean(-1)), ("_visible", visible.mean(-1))):
        out[f"first_token{name}"] = scores.cpu().numpy()
        out[f"share{name}"] = (scores > SINK_THRESHOLD).double().mean(-1).cpu().numpy()
    return out


def sink_summary(values, task, heads):
    """One row per layer: the share of heads whose mean attention to position 0 (over queries, then samples) exceeds
    SINK_THRESHOLD (Gu et al.'s), the per-sample share's mean and std, the same share and mean attention over the
    queries that see position 0 (sink_values), and each head's mean attention to position 0 (head_1 ... head_H)
    with their mean over heads."""
    rows = []
    for layer in range(values["share"].shape[1]):
        first = values["first_token"][:, layer].mean(0)  # (H,), over samples
        visible = values["first_token_visible"][:, layer].mean(0)
        rows.append({"task": task, "heads": heads, "layer": layer + 1,
                     "sink_share": float((first > SINK_THRESHOLD).mean()),
                     "sink_share_per_sample_mean": float(values["share"][:, layer].mean()),
                     "sink_share_per_sample_std": float(values["share"][:, layer].std()),
                     "first_token_mean": float(first.mean()),
                     "sink_share_visible": float((visible > SINK_THRESHOLD).mean()),
                     "first_token_visible_mean": float(visible.mean()),
                     **{f"head_{h + 1}": float(a) for h, a in enumerate(first)}})
    return rows


def without_first_token(attn):
    """The DAG without position 0 (a language model's attention sink): positions 1..T-1, each query's attention to
    them renormalised to sum 1, A'[i, j] = A[i, j] / sum_{k >= 1} A[i, k], (..., T-1, T-1). A query that attends to
    position 0 alone (its other weights rounded to 0 in the model's float32 softmax) keeps to itself there,
    A'[i, i] = 1: it has nothing else to pass on. In float64, as every study (a model's attention is float32)."""
    rest = torch.as_tensor(attn).double()[..., 1:, 1:]
    mass = rest.sum(-1, keepdim=True)
    empty = mass <= 0
    if empty.any():
        rest = torch.where(empty, torch.eye(rest.shape[-1], dtype=rest.dtype, device=rest.device), rest)
        mass = torch.where(empty, torch.ones_like(mass), mass)
    return rest / mass


def layer_study_values(attn, weights, cfg, studies=STUDIES, lengths=(), window=None):
    """{study: {name: (S,) array}} of one layer's attention (S, H, T, T) with its head weights (H,): section4 (the
    combination's mixing time, the authors' walk and the principled one, with the share of their walks that the
    cap of cfg.max_steps stops, its fidelity at the paper's horizon and, certified, at convergence), tables56 and
    synergy (head_set_values, diversity among them), theorem29, and prefix
    ({n: values} at the prefix lengths), sink (sink_values, window: a sliding-window layer's); the head sets' values
    that tables56 and synergy share under "head_sets".
    Each value is a column of the study's summary, as for the toy models."""
    with proxies.trusted_layer(torch.as_tensor(attn)) as attn:  # checked once here, not by every proxy
        return _layer_study_values(attn, weights, cfg, studies, lengths, window)


def _layer_study_values(attn, weights, cfg, studies, lengths, window):
    """layer_study_values of a checked float64 attention."""
    layer, w = attn[:, None], np.asarray(weights, dtype=float)[None]  # one layer: (S, 1, H, T, T), (1, H)
    out = {}
    if {"section4", "prefix", "tables56", "synergy"} & set(studies):
        C = proxies.combine_heads(layer, w)[..., None, :, :]  # (S, 1, 1, T, T): combined once, for every value
    walked = section4_walk_values(C, cfg) if "section4" in studies else {}
    if {"tables56", "synergy"} & set(studies):
        values, diversity = head_set_values(layer, w, cfg, combined_mixing=walked.get("mixing_time"),
                                            combined=C[..., 0, :, :])
        out["head_sets"] = {"values": values, "diversity": diversity}  # tables56 and synergy
    if "section4" in studies:  # the combination's fidelity: the head sets' where they stepped it (the same value)
        fidelity = (values["fidelity"]["combined"] if "head_sets" in out else
                    proxies.minimax_fidelity(C, horizon=cfg.horizon))
        out["section4"] = {**section4_columns(walked, fidelity),
                           "fidelity_converged": 100 * proxies.converged_minimax_fidelity(C[:, 0, 0])[0][:, None]}
    if "theorem29" in studies:
        out["theorem29"] = theorem29_values(layer, w)
    if "prefix" in studies:
        whole = ({"mixing": out["theorem29"]["mixing"], "bound": out["theorem29"]["bound"],
                  **{name: out["section4"][name] for name in ("mixing_time", "fidelity")}}
                 if {"section4", "theorem29"} <= set(studies) else None)  # n = T: stepped once, by those studies
        out["prefix"] = prefix_values(layer, w, [n for n in lengths if n <= attn.shape[-1]], cfg, whole, C)
    if "sink" in studies:
        out["sink"] = {name: value[:, None] for name, value in sink_values(attn, window).items()}  # (S, 1[, H])
    # in the order of samples.csv's columns, section4 first (filled after the head sets, whose fidelity it reads)
    return {key: out[key] for key in ("section4", "head_sets", "theorem29", "prefix", "sink") if key in out}
