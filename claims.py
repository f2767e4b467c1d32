"""Every claim of the paper and of our README, each a named test on one training run's table, counted over runs.

    from claims import CLAIMS, count_claims, write_claims
    count_claims({"section4": per_run, "tables56": ..., "synergy": ...})   # one row per claim and instance
    write_claims(Path("results/seeds"))     # claims.{csv,md} from whichever per-run tables that folder holds

A claim's test takes one run's rows of its table and returns {Instance: holds}. An Instance names where the claim is
tested: its task, head count and layer, each a label ("4", or "all", "1 vs all", "8 vs 16" for a claim over several
head counts; "last", ">= 3" for one over several layers).
"""
import dataclasses
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from config import AUTHORS
from script_io import save_table, write_text

RUN_TABLES = {"section4": "section4_runs.csv", "tables56": "tables56_runs.csv", "synergy": "synergy_runs.csv",
              "theorem29": "theorem29_runs.csv", "prefix": "prefix_runs.csv"}
SIGNIFICANCE = 0.05  # every p-value test below: p < SIGNIFICANCE


class Instance(NamedTuple):
    task: str
    heads: str
    layer: str


@dataclasses.dataclass(frozen=True)
class Claim:
    name: str
    table: str  # the key of RUN_TABLES whose rows it tests
    source: str  # paper, title (the paper's title claim) or README (ours)
    test_text: str
    test: Callable


CLAIMS = []  # in the order of claims.csv: the order of the definitions below


def claim(table, source, test_text):
    """Register the decorated test as a claim named after it."""
    def register(test):
        CLAIMS.append(Claim(test.__name__, table, source, test_text, test))
        return test
    return register


def _per_task_and_layer(t):
    return t.groupby(["task", "layer"], sort=False)


def _per_row(t, condition):
    return {Instance(r.task, str(r.heads), str(r.layer)): bool(condition(r)) for r in t.itertuples()}


# Section 4 (section4_runs: mixing_time_mean and fidelity_mean per task, heads and layer)
@claim("section4", "paper",
       "mixing_time_mean of the 1-head model > that of every multi-head model (per task and layer)")
def one_head_mixes_slowest(t):
    out = {}
    for (task, layer), g in _per_task_and_layer(t):
        if 1 in set(g.heads) and g.heads.nunique() > 1:
            mixing = g.set_index("heads").mixing_time_mean
            out[Instance(task, "1 vs all", str(layer))] = bool((mixing.drop(1) < mixing[1]).all())
    return out


@claim("section4", "paper",
       "fidelity_mean strictly increasing over the head counts 1 < 4 < 8 < 16 (per task and layer)")
def fidelity_rises_with_heads(t):
    return {Instance(task, "all", str(layer)): bool(g.sort_values("heads").fidelity_mean.diff().dropna().gt(0).all())
            for (task, layer), g in _per_task_and_layer(t) if g.heads.nunique() > 1}


def _last_cycle_layer(t):
    """Per cycle head count: (the last layer mixes slowest, the last layer has the lowest fidelity), ties allowed."""
    out = {}
    for heads, g in t[t.task == "cycle"].groupby("heads", sort=False):
        g = g.set_index("layer")
        last, rest = g.loc[g.index.max()], g.drop(g.index.max())
        out[Instance("cycle", str(heads), "last")] = (bool((last.mixing_time_mean >= rest.mixing_time_mean).all()),
                                                      bool((last.fidelity_mean <= rest.fidelity_mean).all()))
    return out


@claim("section4", "paper",
       "cycle, per head count: the last layer's mixing_time_mean >= and fidelity_mean <= every other layer's")
def last_cycle_layer_poorest_both(t):
    return {key: slowest and poorest for key, (slowest, poorest) in _last_cycle_layer(t).items()}


@claim("section4", "paper", "cycle, per head count: the last layer's mixing_time_mean >= every other layer's")
def last_cycle_layer_slowest(t):
    return {key: slowest for key, (slowest, _) in _last_cycle_layer(t).items()}


@claim("section4", "paper", "cycle, per head count: the last layer's fidelity_mean <= every other layer's")
def last_cycle_layer_lowest_fidelity(t):
    return {key: poorest for key, (_, poorest) in _last_cycle_layer(t).items()}


@claim("section4", "README", "layer 1: mixing_time_mean < 4 steps")
def layer1_mixes_under_4_steps(t):
    return _per_row(t[t.layer == 1], lambda r: r.mixing_time_mean < 4)


@claim("section4", "README",
       "copy, per layer: |mixing time 8 heads - 16 heads| <= 0.1 steps and |fidelity| difference <= 0.1 points")
def copy_8_and_16_heads_alike(t):
    g = t[t.task == "copy"].set_index(["heads", "layer"])
    if not {8, 16} <= set(g.index.get_level_values(0)):
        return {}
    return {Instance("copy", "8 vs 16", str(layer)): bool(
        abs(g.mixing_time_mean[8, layer] - g.mixing_time_mean[16, layer]) <= 0.1
        and abs(g.fidelity_mean[8, layer] - g.fidelity_mean[16, layer]) <= 0.1)
        for layer in sorted(set(g.loc[8].index) & set(g.loc[16].index))}


@claim("section4", "README",
       "cycle, per multi-head model: some layer >= 3 has mixing_time_mean > 20 steps and fidelity_mean < 0.05%")
def cycle_deep_layer_collapses(t):
    cycle = t[(t.task == "cycle") & (t.heads > 1)]
    return {Instance("cycle", str(heads), ">= 3"): bool(
        ((g.layer >= 3) & (g.mixing_time_mean > 20) & (g.fidelity_mean < 0.05)).any())
        for heads, g in cycle.groupby("heads", sort=False)}


# Tables 5-6 (tables56_runs: the one-sequence verdict and the sign test over fresh sequences)
def wins_majority(r, sign):
    """A tables56 row's verdict, here and in pretrained.py's summary: the combination wins (sign +1) or loses (-1)
    against its best head in more than half the decided samples, sign test significant."""
    decided = r.samples - r.ties
    return r.p_value < SIGNIFICANCE and sign * (r.wins - decided / 2) > 0


@claim("tables56", "paper", "Tables 5-6, the paper's protocol: combined fidelity > best single head's on sample 0")
def combination_beats_best_head_one_sequence(t):
    return _per_row(t, lambda r: r.amplification)


@claim("tables56", "paper",
       "over the fresh sequences: combined > best head in more than half the decided ones, sign test p < 0.05")
def combination_wins_majority(t):
    return _per_row(t, lambda r: wins_majority(r, +1))


@claim("tables56", "README",
       "over the fresh sequences: combined > best head in fewer than half the decided ones, sign test p < 0.05")
def combination_loses_majority(t):
    return _per_row(t, lambda r: wins_majority(r, -1))


# Synergy (synergy_runs: per proxy, synergy against parallel heads and gain over the best head, signed so that
# positive means the combination helps, with Wilcoxon p-values)
def synergy_significant(r, sign):
    """A synergy row's verdict, here and in pretrained.py's summary: synergy of this sign (+1: the combination helps)
    with Wilcoxon p < SIGNIFICANCE."""
    return sign * r.synergy > 0 and r.p_value < SIGNIFICANCE


def _synergy_of_sign(t, proxy, sign):
    return _per_row(t[t.proxy == proxy], lambda r: synergy_significant(r, sign))


@claim("synergy", "title", "fidelity: mean paired synergy (combined vs parallel heads) > 0, Wilcoxon p < 0.05")
def synergy_positive_fidelity(t):
    return _synergy_of_sign(t, "fidelity", +1)


@claim("synergy", "title", "fidelity: mean paired synergy (combined vs parallel heads) < 0, Wilcoxon p < 0.05")
def synergy_negative_fidelity(t):
    return _synergy_of_sign(t, "fidelity", -1)


@claim("synergy", "title", "mixing_time: mean paired synergy (combined vs parallel heads) > 0, Wilcoxon p < 0.05")
def synergy_positive_mixing_time(t):
    return _synergy_of_sign(t, "mixing_time", +1)


@claim("synergy", "title", "mixing_time: mean paired synergy (combined vs parallel heads) < 0, Wilcoxon p < 0.05")
def synergy_negative_mixing_time(t):
    return _synergy_of_sign(t, "mixing_time", -1)


@claim("synergy", "README", "mixing time: best single head < combination (mean paired difference), Wilcoxon p < 0.05")
def best_head_mixes_faster(t):
    return _per_row(t[t.proxy == "mixing_time"],
                    lambda r: r.gain_over_best < 0 and r.gain_over_best_p < SIGNIFICANCE)


@claim("synergy", "README", "fidelity: combination > best single head (mean paired difference), Wilcoxon p < 0.05")
def combination_beats_best_head_fidelity(t):
    return _per_row(t[t.proxy == "fidelity"], lambda r: r.gain_over_best > 0 and r.gain_over_best_p < SIGNIFICANCE)


def _diversity_goes_with_synergy(t, proxy):
    """Spearman rho(diversity, synergy) over the run's layers > 0 and significant; untested (no instance) with fewer
    than 3 layers or no spread."""
    t = t[t.proxy == proxy]
    if len(t) < 3 or t.synergy.nunique() < 2 or t.diversity.nunique() < 2:
        return {}
    result = stats.spearmanr(t.diversity, t.synergy)
    return {Instance("all", "all", "all"): bool(result.statistic > 0 and result.pvalue < SIGNIFICANCE)}


@claim("synergy", "README",
       "fidelity: Spearman rho(head diversity, synergy) over every task, head count and layer > 0, p < 0.05")
def diversity_goes_with_synergy_fidelity(t):
    return _diversity_goes_with_synergy(t, "fidelity")


@claim("synergy", "README",
       "mixing_time: Spearman rho(head diversity, synergy) over every task, head count and layer > 0, p < 0.05")
def diversity_goes_with_synergy_mixing_time(t):
    return _diversity_goes_with_synergy(t, "mixing_time")


# Theory (theorem29_runs: per task, heads and layer, means over sequences; prefix_runs: the same per prefix length n)
@claim("theorem29", "paper", "Theorem 2.9: every sequence's worst-start epsilon-mixing time <= 2N/p, p from each "
                             "head's worst node (layers where it can be told)")
def theorem29_bound_holds(t):
    return _per_row(t[t.bound_holds_share.notna()], lambda r: r.bound_holds_share == 1)


@claim("theorem29", "README", "2N/p with each head's mean node's p (a heuristic): holds in every sequence")
def theorem29_mean_node_bound_holds(t):
    return _per_row(t[t.mean_node_holds_share.notna()], lambda r: r.mean_node_holds_share == 1)


@claim("theorem29", "paper", "multi-head layers: averaged epsilon-mixing time of the combination <= 1.1 x its "
                             "fastest head's (means over sequences)")
def combination_mixes_near_fastest_head(t):
    return _per_row(t[t.heads > 1], lambda r: r.mixing <= 1.1 * r.fastest_head)


TOO_FEW_LENGTHS = "too few lengths"  # two points lie on any line: log n and n cannot be told apart


def growth_fit(n, values):
    """How values grow with n: R^2 of the least-squares line against log n and against n; "log" if the first fits
    better, else "linear"; "not mixed" where some value is inf; "too few lengths" below 3 lengths, where both lines
    fit exactly. Returns (r2_log, r2_linear, growth)."""
    n, y = np.asarray(n, dtype=float), np.asarray(values, dtype=float)
    if not np.isfinite(y).all():
        return float("nan"), float("nan"), "not mixed"
    if len(np.unique(n)) < 3:
        return float("nan"), float("nan"), TOO_FEW_LENGTHS

    def r2(x):
        residual = y - np.polyval(np.polyfit(x, y, 1), x)
        total = ((y - y.mean()) ** 2).sum()
        return float(1 - (residual ** 2).sum() / total) if total > 0 else 1.0
    r2_log, r2_linear = r2(np.log(n)), r2(n)
    return r2_log, r2_linear, "log" if r2_log > r2_linear else "linear"


def growth_exponents(n, values):
    """beta, the least-squares slope of log(values) against log(n), of each row of values (..., len(n)): T_mix ~ n^beta.
    0 is log-like (flat on this scale), 1 linear (the line graph), in between a power law. NaN in a row with a value
    that is not finite and positive (a walk that never mixed) and where n has fewer than 2 lengths."""
    x = np.log(np.asarray(n, dtype=float))
    y = np.asarray(values, dtype=float)
    valid = (np.isfinite(y) & (y > 0)).all(-1) & (len(np.unique(x)) >= 2)
    logs = np.log(np.where(valid[..., None], y, 1.0))
    centred = x - x.mean()
    slope = (logs * centred).sum(-1) / max((centred ** 2).sum(), np.finfo(float).tiny)
    return np.where(valid, slope, np.nan)


def exponent_interval(n, per_sample, *, draws, seed, confidence=0.95):
    """A percentile bootstrap interval of beta over samples: per_sample (S, len(n)) holds each sample's values;
    draws resamples of the S samples (rows drawn with replacement, np.random.default_rng(seed).integers(0, S,
    (draws, S))), each averaged over its samples and refitted (growth_exponents). Returns (low, high); NaN where
    beta is."""
    per_sample = np.asarray(per_sample, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(per_sample), (draws, len(per_sample)))
    betas = growth_exponents(n, per_sample[rows].mean(1))
    if np.isnan(betas).any():
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(betas, [tail, 100 - tail])
    return float(low), float(high)


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values: sorted ascending, the k-th (from 0) becomes
    max over j <= k of min(1, (m - j) p_(j)); each adjusted p < SIGNIFICANCE is significant with the family's error
    rate held at SIGNIFICANCE. In the order given."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    adjusted = np.empty_like(p)
    adjusted[order] = stepped
    return adjusted


def growth_table(prefix):
    """Per (run where present), task, head count and layer of a prefix table: how the layer's averaged
    epsilon-mixing time (`mixing`) grows with n (growth_fit), and beta, its exponent (growth_exponents)."""
    keys = [k for k in ("run", "task", "heads", "layer") if k in prefix.columns]
    rows = []
    for key, part in prefix.groupby(keys, sort=False):
        r2_log, r2_linear, growth = growth_fit(part.n, part.mixing)
        rows.append({**dict(zip(keys, key)), "r2_log": r2_log, "r2_linear": r2_linear, "growth": growth,
                     "beta": float(growth_exponents(part.n, part.mixing))})
    return pd.DataFrame(rows)


@claim("prefix", "README", "averaged epsilon-mixing time over the prefix lengths n: a + b log n fits better (R^2) "
                           "than a + b n")
def mixing_grows_like_log_n(t):
    return {Instance(task, str(heads), str(layer)): growth_fit(g.n, g.mixing)[2] == "log"
            for (task, heads, layer), g in t.groupby(["task", "heads", "layer"], sort=False)}


COLUMNS = ["claim", "task", "heads", "layer", "runs_holding", "runs", "holding", "authors_holds", "study_runs",
           "source", "test"]


def study_runs(table):
    """The runs a per-run table holds, in its order, as one string: "42 0 1 2 3 4 authors"."""
    return " ".join(dict.fromkeys(table.run.astype(str)))


def count_claims(tables):
    """tables: {a key of RUN_TABLES: per-run table with a `run` column}. For every claim and instance: in how many
    of our runs it holds, out of how many, which, whether it holds for the authors' models ("" if absent), and the
    runs of the study it was counted over (study_runs). The authors' run never counts among ours."""
    rows = []
    for c in (c for c in CLAIMS if c.table in tables):
        results, runs = {}, study_runs(tables[c.table])
        for run, part in tables[c.table].groupby("run", sort=False):
            for instance, holds in c.test(part).items():
                results.setdefault(instance, {})[str(run)] = holds
        for instance, by_run in results.items():
            ours = {run: holds for run, holds in by_run.items() if run != AUTHORS}
            rows.append({"claim": c.name, **instance._asdict(), "runs_holding": sum(ours.values()), "runs": len(ours),
                         "holding": " ".join(run for run, holds in ours.items() if holds),
                         "authors_holds": by_run.get(AUTHORS, ""), "study_runs": runs, "source": c.source,
                         "test": c.test_text})
    return pd.DataFrame(rows, columns=COLUMNS)


def runs_note(claims):
    """One line on the runs the claims were counted over: the same in every study, or a warning naming each
    study's runs when they differ (then counts of different studies are over different runs)."""
    table_of = {c.name: c.table for c in CLAIMS}
    studies = claims.drop_duplicates("claim").groupby("study_runs", sort=False).claim.apply(
        lambda names: sorted({table_of[n] for n in names}))
    if len(studies) <= 1:
        return f"Every study over the same runs: {studies.index[0] if len(studies) else 'none'}."
    return ("**Warning: the studies hold different runs**, so their counts are over different runs: "
            + "; ".join(f"{', '.join(tables)}: {runs}" for runs, tables in studies.items()) + ".")


def claims_overview(claims):
    """One row per claim: how many of its instances hold in every one of our runs, in some, in none (over `runs` of
    ours), and in the authors' models ("k of n", "–" without them). claims as count_claims gives it, or as read back
    from claims.csv (authors_holds then the strings "True", "False" or empty)."""
    rows = []
    for name, part in claims.groupby("claim", sort=False):
        every, none = int((part.runs_holding == part.runs).sum()), int((part.runs_holding == 0).sum())
        authors = part.authors_holds.astype(str)
        authors = authors[authors != ""]
        rows.append({"claim": name, "source": part.source.iloc[0], "runs": int(part.runs.max()),
                     "instances": len(part), "in every run": every, "in some": len(part) - every - none,
                     "in none": none,
                     "the authors'": f"{int((authors == 'True').sum())} of {len(authors)}" if len(authors) else "–"})
    return pd.DataFrame(rows)


def claims_markdown(claims):
    """Per claim: its test and claims_overview's counts; then the full table."""
    lines = ["# The claims, counted over training runs", "",
             "Each claim is tested on each run alone; `runs_holding` of `runs` of ours hold it (the authors' models, "
             "where present, apart). source: paper = the paper's claim, title = its title claim, README = ours.", "",
             runs_note(claims), ""]
    tests = dict(zip(claims.claim, claims.test))
    for _, r in claims_overview(claims).iterrows():
        authors = r["the authors'"]
        lines.append(f"- **{r.claim}** ({r.source}): {tests[r.claim]}. Of {r.instances} instance(s): "
                     f"{r['in every run']} hold in every run of ours, {r['in some']} in some, {r['in none']} in none"
                     + (f"; the authors' models: {authors}." if authors != "–" else "."))
    view = claims.drop(columns=["study_runs", "source", "test"])
    return "\n".join(lines + ["", view.to_markdown(index=False), ""])


def write_claims(folder):
    """claims.csv and claims.md in `folder`, from whichever per-run tables it holds; returns the claims table. Each
    claim is counted over its own study's runs (study_runs); where the studies hold different runs, claims.md opens
    with a warning that names them (runs_note)."""
    folder = Path(folder)
    tables = {table: pd.read_csv(folder / name, dtype={"run": str}) for table, name in RUN_TABLES.items()
              if (folder / name).is_file()}
    claims = count_claims(tables)
    save_table(claims, folder / "claims")
    write_text(folder / "claims.md", claims_markdown(claims))
    return claims
