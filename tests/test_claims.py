"""Every claim of claims.py on constructed rows at its boundaries (ties, values exactly at a threshold, p exactly at
SIGNIFICANCE), each answer worked out by hand from the claim's text; and count_claims with the authors' run."""
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

import claims
from claims import Instance as I
from config import AUTHORS

SECTION4 = ["task", "heads", "layer", "mixing_time_mean", "fidelity_mean"]


def section4(*rows):
    return pd.DataFrame(rows, columns=SECTION4)


def test_layer1_under_4_steps_is_strict():
    t = section4(("copy", 4, 1, 4.0, 1.0), ("copy", 8, 1, 3.999, 1.0), ("copy", 8, 2, 1.0, 1.0))
    assert claims.layer1_mixes_under_4_steps(t) == {I("copy", "4", "1"): False, I("copy", "8", "1"): True}


def test_one_head_slowest_is_strict_per_task_and_layer():
    t = section4(("copy", 1, 1, 5.0, 0), ("copy", 4, 1, 5.0, 0), ("copy", 8, 1, 1.0, 0),  # a tie: fails
                 ("copy", 1, 2, 5.0, 0), ("copy", 4, 2, 4.9, 0), ("copy", 8, 2, 1.0, 0),
                 ("cycle", 4, 1, 9.0, 0), ("cycle", 8, 1, 1.0, 0))  # no 1-head model: untested
    assert claims.one_head_mixes_slowest(t) == {I("copy", "1 vs all", "1"): False, I("copy", "1 vs all", "2"): True}


def test_fidelity_rises_strictly_whatever_the_row_order():
    t = section4(("copy", 16, 1, 0, 0.3), ("copy", 1, 1, 0, 0.1), ("copy", 8, 1, 0, 0.25), ("copy", 4, 1, 0, 0.2),
                 ("copy", 1, 2, 0, 0.1), ("copy", 4, 2, 0, 0.2), ("copy", 8, 2, 0, 0.2), ("copy", 16, 2, 0, 0.3))
    assert claims.fidelity_rises_with_heads(t) == {I("copy", "all", "1"): True, I("copy", "all", "2"): False}


def test_last_cycle_layer_ties_count_and_each_half_alone():
    t = section4(("cycle", 4, 1, 10, 0.5), ("cycle", 4, 3, 30, 0.1), ("cycle", 4, 2, 30, 0.1),  # ties: both hold
                 ("cycle", 8, 1, 10, 0.5), ("cycle", 8, 2, 31, 0.2), ("cycle", 8, 3, 30, 0.1),  # only the fidelity
                 ("cycle", 16, 1, 10, 0.05), ("cycle", 16, 2, 9, 0.2), ("cycle", 16, 3, 30, 0.1),  # only the mixing
                 ("copy", 4, 1, 50, 0.0), ("copy", 4, 2, 1, 1.0))  # copy: never tested
    key = lambda h: I("cycle", str(h), "last")
    assert claims.last_cycle_layer_slowest(t) == {key(4): True, key(8): False, key(16): True}
    assert claims.last_cycle_layer_lowest_fidelity(t) == {key(4): True, key(8): True, key(16): False}
    assert claims.last_cycle_layer_poorest_both(t) == {key(4): True, key(8): False, key(16): False}


def test_copy_8_and_16_alike_within_0_1_inclusive():
    # 0.1 - 0.0 is exactly 0.1 in floating point: the boundary itself holds
    t = section4(("copy", 8, 1, 0.1, 0.0), ("copy", 16, 1, 0.0, 0.1),
                 ("copy", 8, 2, 0.125, 1.0), ("copy", 16, 2, 0.0, 1.0),  # mixing times 0.125 apart
                 ("copy", 8, 3, 2.0, 0.0), ("copy", 16, 3, 2.0, 0.125),  # fidelities 0.125 apart
                 ("copy", 8, 4, 2.0, 0.0), ("cycle", 8, 1, 0.0, 0.0), ("cycle", 16, 1, 9.0, 9.0))
    assert claims.copy_8_and_16_heads_alike(t) == {I("copy", "8 vs 16", "1"): True, I("copy", "8 vs 16", "2"): False,
                                                   I("copy", "8 vs 16", "3"): False}
    assert claims.copy_8_and_16_heads_alike(t[t.heads != 16]) == {}


def test_cycle_collapse_needs_both_strictly_in_one_layer_from_3():
    t = section4(("cycle", 4, 3, 20.0, 0.0), ("cycle", 4, 4, 25.0, 0.05),  # exactly 20 steps, exactly 0.05 %
                 ("cycle", 8, 2, 50.0, 0.0), ("cycle", 8, 3, 21.0, 0.04),
                 ("cycle", 16, 2, 50.0, 0.0), ("cycle", 16, 3, 25.0, 1.0), ("cycle", 16, 4, 5.0, 0.0),  # split
                 ("cycle", 1, 3, 50.0, 0.0), ("copy", 4, 3, 50.0, 0.0))  # one head and copy: never tested
    key = lambda h: I("cycle", str(h), ">= 3")
    assert claims.cycle_deep_layer_collapses(t) == {key(4): False, key(8): True, key(16): False}


def test_majority_claims_need_p_below_0_05_and_more_than_half_of_the_decided():
    t = pd.DataFrame([{"task": "copy", "heads": 4, "layer": layer, "amplification": amp, "wins": wins, "ties": 10,
                       "samples": 50, "p_value": p} for layer, amp, wins, p in
                      [(1, True, 30, 0.05), (2, False, 20, 0.001), (3, True, 21, 0.001), (4, False, 19, 0.049)]])
    key = lambda layer: I("copy", "4", str(layer))
    assert claims.combination_wins_majority(t) == {key(1): False, key(2): False, key(3): True, key(4): False}
    assert claims.combination_loses_majority(t) == {key(1): False, key(2): False, key(3): False, key(4): True}
    assert claims.combination_beats_best_head_one_sequence(t) == {key(1): True, key(2): False, key(3): True,
                                                                  key(4): False}


def synergy_table(rows):
    return pd.DataFrame([{"task": "cycle", "heads": 8, "layer": layer, "proxy": proxy, "synergy": s, "p_value": p,
                          "gain_over_best": g, "gain_over_best_p": gp, "diversity": d}
                         for proxy, layer, s, p, g, gp, d in rows])


def test_synergy_and_best_head_claims_read_their_own_p_values():
    # the synergy claims read p_value, the best-head claims gain_over_best_p: each row sets them apart
    t = synergy_table([("fidelity", 1, 0.0, 0.001, 0.1, 0.05, 0.1), ("fidelity", 2, 0.01, 0.05, 0.1, 0.049, 0.2),
                       ("fidelity", 3, -0.01, 0.049, -0.1, 0.001, 0.3),
                       ("mixing_time", 1, 0.2, 0.01, -1.0, 0.5, 0.1), ("mixing_time", 2, -0.3, 0.001, 0.0, 0.001, 0.2),
                       ("mixing_time", 3, 0.1, 0.2, -1.0, 0.01, 0.3)])
    key = lambda layer: I("cycle", "8", str(layer))
    answers = {"synergy_positive_fidelity": (False, False, False), "synergy_negative_fidelity": (False, False, True),
               "synergy_positive_mixing_time": (True, False, False),
               "synergy_negative_mixing_time": (False, True, False),
               "combination_beats_best_head_fidelity": (False, True, False),
               "best_head_mixes_faster": (False, False, True)}
    for name, holds in answers.items():
        assert getattr(claims, name)(t) == {key(layer): h for layer, h in zip((1, 2, 3), holds)}, name


def test_diversity_claim_needs_three_layers_with_spread_and_a_significant_positive_rho():
    rows = lambda synergies, diversities: synergy_table([("fidelity", layer + 1, s, 0.5, 0.0, 0.5, d) for layer, (s, d)
                                                         in enumerate(zip(synergies, diversities))])
    everything = I("all", "all", "all")
    # three layers in the same order: rho = 1, p = 0
    assert claims.diversity_goes_with_synergy_fidelity(rows([1, 2, 3], [0.1, 0.2, 0.3])) == {everything: True}
    assert claims.diversity_goes_with_synergy_fidelity(rows([1, 2], [0.1, 0.2])) == {}  # two layers: untested
    assert claims.diversity_goes_with_synergy_fidelity(rows([1, 1, 1], [0.1, 0.2, 0.3])) == {}  # no spread
    assert claims.diversity_goes_with_synergy_fidelity(rows([3, 2, 1], [0.1, 0.2, 0.3])) == {everything: False}
    # four layers, ranks 1 3 2 4: rho = 1 - 6 * 2 / 60 = 0.8 > 0 but p = 0.2: not significant
    assert claims.diversity_goes_with_synergy_fidelity(rows([1, 3, 2, 4], [0.1, 0.2, 0.3, 0.4])) == {everything: False}
    assert claims.diversity_goes_with_synergy_mixing_time(rows([1, 2, 3], [0.1, 0.2, 0.3])) == {}  # no such rows


def test_count_claims_keeps_the_authors_apart_over_several_instances():
    rows = [(run, "copy", heads, 1, mixing, 1.0) for run, by_heads in
            [("0", {4: 3.0, 8: 5.0}), ("1", {4: 3.5, 8: 3.9}), (AUTHORS, {4: 9.0, 8: 1.0})]
            for heads, mixing in by_heads.items()]
    table = pd.DataFrame(rows, columns=["run", *SECTION4])
    counted = claims.count_claims({"section4": table}).set_index(["claim", "heads"]).loc["layer1_mixes_under_4_steps"]
    assert list(counted.runs_holding) == [2, 1] and list(counted.runs) == [2, 2]
    assert list(counted.holding) == ["0 1", "1"] and list(counted.authors_holds) == [False, True]


def test_theory_claims_at_their_boundaries():
    t = pd.DataFrame([{"task": "copy", "heads": heads, "layer": layer, "bound_holds_share": holds,
                       "mean_node_holds_share": mean_node, "mixing": mixing, "fastest_head": fastest}
                      for heads, layer, holds, mean_node, mixing, fastest in
                      [(1, 1, 1.0, 0.98, 5.0, 5.0),  # one head: never in the 10% claim
                       (4, 1, 1.0, 1.0, 1.1 * 10.0, 10.0),  # exactly 1.1 x the fastest head: holds
                       (4, 2, 0.98, float("nan"), 11.5, 10.0),  # one sequence over the bound; mean node untold
                       (4, 3, float("nan"), 1.0, 9.0, 10.0)]])  # cannot be told: no instance
    key = lambda heads, layer: I("copy", str(heads), str(layer))
    assert claims.theorem29_bound_holds(t) == {key(1, 1): True, key(4, 1): True, key(4, 2): False}
    assert claims.theorem29_mean_node_bound_holds(t) == {key(1, 1): False, key(4, 1): True, key(4, 3): True}
    assert claims.combination_mixes_near_fastest_head(t) == {key(4, 1): True, key(4, 2): False, key(4, 3): True}


def test_growth_claim_fits_log_and_linear_by_hand():
    n = [8, 16, 32, 64, 100]
    rows = lambda layer, values: [{"task": "cycle", "heads": 4, "layer": layer, "n": k, "mixing": v}
                                  for k, v in zip(n, values)]
    t = pd.DataFrame(rows(1, [3 + 2 * np.log(k) for k in n]) + rows(2, [1 + 0.9 * k for k in n])
                     + rows(3, [5, 6, float("inf"), 7, 8]))
    key = lambda layer: I("cycle", "4", str(layer))
    assert claims.mixing_grows_like_log_n(t) == {key(1): True, key(2): False, key(3): False}
    r2_log, r2_linear, growth = claims.growth_fit(n, [3 + 2 * np.log(k) for k in n])
    assert r2_log == pytest.approx(1.0) and r2_linear < 0.95 and growth == "log"
    assert claims.growth_fit(n, [1 + 0.9 * k for k in n])[1:] == (pytest.approx(1.0), "linear")
    assert claims.growth_fit(n, [5, 6, float("inf"), 7, 8])[2] == "not mixed"


def test_growth_exponent_of_power_laws_logs_and_lines_by_hand():
    """T = 3 n^0.5 has beta 0.5 exactly; a line through the origin 1; 4 + log n's slope on the log-log scale is
    (log(4 + log 100) - log(4 + log 8)) / (log 100 - log 8) over the two ends alone, near 0.15; a walk that never
    mixed (inf) and a single length give NaN; rows of a 2-d array are fitted apart. growth_table carries beta."""
    n = np.array([8, 16, 32, 64, 100])
    assert claims.growth_exponents(n, 3 * n ** 0.5) == pytest.approx(0.5)
    assert claims.growth_exponents(n, 0.7 * n) == pytest.approx(1.0)
    two = [8, 100]
    by_hand = (np.log(4 + np.log(100)) - np.log(4 + np.log(8))) / (np.log(100) - np.log(8))
    assert claims.growth_exponents(two, 4 + np.log(two)) == pytest.approx(by_hand) and 0.1 < by_hand < 0.2
    assert np.isnan(claims.growth_exponents(n, [5, 6, np.inf, 7, 8]))
    assert np.isnan(claims.growth_exponents([16], [3.0]))
    assert claims.growth_exponents(n, np.stack([n ** 0.25, n ** 2.0])) == pytest.approx([0.25, 2.0])
    t = pd.DataFrame([{"task": "copy", "heads": 4, "layer": 1, "n": k, "mixing": 2 * k ** 0.3} for k in n])
    assert claims.growth_table(t).beta.tolist() == [pytest.approx(0.3)]


def test_exponent_interval_collapses_without_spread_and_covers_a_known_exponent():
    """Identical samples: every resample is the same, so the interval is beta itself. Samples c_s n^0.4 with c_s
    spread: every resample's mean is c n^0.4, beta exactly 0.4, whatever the draw. With noise on top, the 95% interval
    of 200 samples holds 0.4 and is narrower than with 20; the same seed gives the same interval."""
    n = np.array([16, 32, 64, 128])
    same = np.tile(5 * n ** 0.7, (6, 1))
    assert claims.exponent_interval(n, same, draws=50, seed=1) == (pytest.approx(0.7), pytest.approx(0.7))
    scaled = np.array([[c * k ** 0.4 for k in n] for c in (1, 2, 5, 9)])
    assert claims.exponent_interval(n, scaled, draws=50, seed=1) == (pytest.approx(0.4), pytest.approx(0.4))
    noise = np.random.default_rng(0).lognormal(0, 0.3, (200, len(n)))
    noisy = 10 * n ** 0.4 * noise
    low, high = claims.exponent_interval(n, noisy, draws=1000, seed=2)
    low20, high20 = claims.exponent_interval(n, noisy[:20], draws=1000, seed=2)
    assert low < 0.4 < high and high - low < high20 - low20
    assert claims.exponent_interval(n, noisy, draws=1000, seed=2) == (low, high)
    assert np.isnan(claims.exponent_interval(n, np.vstack([noisy[:3], [1, 2, np.inf, 4]]), draws=10, seed=0)).all()


def test_holm_by_hand():
    """Holm on (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 are 0.02, 0.03,
    0.06, 0.04; each at least the one before: 0.02, 0.03, 0.06, 0.06; back in the order given. Large p-values stop at
    1; a family of one is unchanged."""
    assert claims.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert claims.holm([0.5, 0.2, 0.9]) == pytest.approx([1.0, 0.6, 1.0])
    assert claims.holm([0.04]) == pytest.approx([0.04])


def test_a_folder_whose_studies_hold_different_runs_is_marked(tmp_path):
    """write_claims counts each claim over its own study's runs, records them (study_runs) and opens claims.md with a
    warning naming each study's runs when the studies differ; the same runs everywhere: one plain line."""
    rows = [("copy", h, 1, 3.0 + h / 100, 1.0 + h) for h in (1, 4)]
    per_run = lambda runs: pd.DataFrame([(run, *row) for run in runs for row in rows], columns=["run", *SECTION4])
    tables56 = lambda runs: pd.DataFrame([{"run": run, "task": "copy", "heads": 4, "layer": 1, "amplification": True,
                                           "p_value": 0.5, "wins": 1, "samples": 2, "ties": 0} for run in runs])
    per_run(["42", "0", "1"]).to_csv(tmp_path / "section4_runs.csv", index=False)
    tables56(["42", "0"]).to_csv(tmp_path / "tables56_runs.csv", index=False)
    table = claims.write_claims(tmp_path)
    assert set(table[table.claim == "one_head_mixes_slowest"].study_runs) == {"42 0 1"}
    assert set(table[table.claim == "combination_wins_majority"].study_runs) == {"42 0"}
    assert set(table[table.claim == "combination_wins_majority"].runs) == {2}
    text = (tmp_path / "claims.md").read_text()
    assert "**Warning: the studies hold different runs**" in text
    assert "section4: 42 0 1" in text and "tables56: 42 0" in text
    tables56(["42", "0", "1"]).to_csv(tmp_path / "tables56_runs.csv", index=False)
    claims.write_claims(tmp_path)
    assert "Every study over the same runs: 42 0 1." in (tmp_path / "claims.md").read_text()


def test_claims_overview_reads_the_csv_strings_of_the_authors():
    """claims.csv gives authors_holds back as "True"/"False"/"": "False" must not count as holding."""
    table = pd.DataFrame({"claim": ["c", "c", "d"], "source": "paper", "runs": 3, "runs_holding": [3, 0, 1],
                          "authors_holds": ["True", "False", ""]})
    overview = claims.claims_overview(table).set_index("claim")
    assert overview.loc["c", ["instances", "in every run", "in some", "in none", "the authors'"]].tolist() == \
        [2, 1, 0, 1, "1 of 2"]
    assert overview.loc["d", "the authors'"] == "–" and overview.loc["d", "in some"] == 1


def test_claims_from_a_folder_count_each_study_over_all_its_runs(tmp_path):
    """The committed seed study's per-run tables copied into a folder: every claim's instances are counted over all
    the runs of its own study's table (six of ours; the authors' apart), and claims.csv comes out as committed."""
    import shutil
    seeds = ROOT / "results" / "seeds"
    for name in claims.RUN_TABLES.values():
        shutil.copy(seeds / name, tmp_path / name)
    table = claims.write_claims(tmp_path)
    for claim in claims.CLAIMS:
        runs = pd.read_csv(tmp_path / claims.RUN_TABLES[claim.table], dtype={"run": str}).run
        ours = len(set(runs) - {"authors"})
        rows = table[table.claim == claim.name]
        assert len(rows) and (rows.runs == ours).all() and ours == 6, claim.name
    assert (tmp_path / "claims.csv").read_text() == (seeds / "claims.csv").read_text()
