"""The amplification map (amplification.py, theory.py --amplification): Section 3's worked argument by matrix
powers, identical heads never amplify, the sharing knob at its ends, Wilson intervals and the summary by hand, the
draws' seeds, the trained layers' placing on the map, and the script end to end in its quick mode."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import amplification
import graphs
from amplification import AMPLIFY_RTOL, amplification_summary, layer_amplification_rows
from checkpoints import load_model
from config import POISSON_P, QUICK, SHARE_LEVELS
from evaluation import head_diversity, head_set_values, wilson_interval


def draws(family, share, size=16, heads=4, n=12, seed=0):
    return graphs.FAMILIES[family](size, heads, n, share, torch.Generator().manual_seed(seed))


def test_worked_argument_by_matrix_powers():
    """Each head alone never brings u's signal to tau; with weights (beta, 1 - beta) the cross term puts exactly
    beta (1 - beta) / 4 there after two steps, so phi_u >= beta (1 - beta) / 4 for every convex beta."""
    by_hand = np.array([[[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1]],  # head 1: u -> v, self-loops, rows = receivers
                        [[1, 0, 0], [0, 1, 0], [0, 0.5, 0.5]]])  # head 2: v -> tau
    assert np.array_equal(graphs.three_node_heads().numpy(), by_hand)
    for head in by_hand:
        assert all(np.linalg.matrix_power(head, t)[2, 0] == 0 for t in range(1, 101))
    betas = np.linspace(0.02, 0.98, 25)
    table = amplification.worked_argument(betas, horizon=100)
    assert (table.phi_u_head_1 == 0).all() and (table.phi_u_head_2 == 0).all()
    for beta, row in zip(betas, table.itertuples()):
        combined = beta * by_hand[0] + (1 - beta) * by_hand[1]
        signal = [np.linalg.matrix_power(combined, t)[2, 0] for t in range(1, 101)]
        assert signal[0] == 0 and signal[1] == pytest.approx(beta * (1 - beta) / 4, rel=1e-12)
        assert row.signal_u_step_2 == pytest.approx(signal[1], rel=1e-12)
        assert row.phi_u_combined == pytest.approx(max(signal), rel=1e-12)
        assert row.phi_u_combined >= row.cross_term_bound == pytest.approx(beta * (1 - beta) / 4)


@pytest.mark.parametrize("family", list(graphs.FAMILIES))
def test_identical_heads_never_amplify(family):
    """All shared: every head of a draw is the same matrix, diversity is exactly 0, the combination equals each head
    (up to float rounding, far below AMPLIFY_RTOL) and no proxy counts a win."""
    attn = draws(family, share=1.0)
    assert all(torch.equal(attn[:, h], attn[:, 0]) for h in range(attn.shape[1]))
    values, diversity = head_set_values(attn, None, QUICK, epsilon_mixing=True)
    assert (diversity == 0).all()
    for proxy, v in values.items():
        assert np.allclose(v["combined"], v["best_head"], rtol=1e-12, atol=0), proxy
    summary = amplification_summary(values, diversity)
    assert all(summary[f"{proxy}_share"] == 0 for proxy in values)


@pytest.mark.parametrize("family", list(graphs.FAMILIES))
def test_sharing_knob_at_its_ends_and_between(family):
    """Diversity is 0 with everything shared and grows as less is shared; with nothing shared every pair of heads
    differs."""
    diversity = [head_diversity(draws(family, share)).mean() for share in (1.0, 0.9, 0.5, 0.0)]
    assert diversity[0] == 0 and all(a < b for a, b in zip(diversity, diversity[1:]))
    independent = draws(family, 0.0)
    assert all(not torch.equal(independent[:, h], independent[:, g]) for h in range(4) for g in range(h))


def test_sparse_heads_keep_their_law_at_every_share():
    """Each head's further edges are there with probability POISSON_P whatever the share (the knob changes only how
    alike the heads are), and the line graph and self-loops are always there."""
    for share in (1.0, 0.5, 0.0):
        attn = draws("sparse", share, size=64, n=32)
        edges = attn > 0
        assert edges.diagonal(dim1=-2, dim2=-1).all() and edges.diagonal(-1, dim1=-2, dim2=-1).all()
        further = edges & torch.ones(32, 32, dtype=torch.bool).tril(-2)
        density = further.sum() / (64 * 4 * 31 * 30 / 2)
        assert abs(float(density) - POISSON_P) < 0.01, share


def test_wilson_interval_by_hand():
    z = stats.norm.ppf(0.975)
    for wins, n in ((7, 10), (0, 20), (20, 20), (534, 1068)):
        p = wins / n
        centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
        half = z / (1 + z ** 2 / n) * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
        assert wilson_interval(wins, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    low, high = wilson_interval(534, 1068)
    assert high - low <= 0.06  # the map's draws: +-3 points at the widest


def test_amplification_summary_by_hand():
    """A win needs more than AMPLIFY_RTOL of the best head's value; fewer steps win for a mixing time."""
    values = {"fidelity": {"combined": np.array([1.0, 2.0, 3.0, 4.0 * (1 + AMPLIFY_RTOL / 10)]),
                           "best_head": np.array([1.0, 1.0, 4.0, 4.0]), "parallel": np.array([0.5, 2.0, 3.0, 4.0])},
              "mixing_time": {"combined": np.array([3.0, 5.0, 4.0, 4.0]), "best_head": np.array([4.0, 4.0, 4.0, 4.0])}}
    row = amplification_summary(values, np.array([0.1, 0.2, 0.3, 0.4]))
    assert row["samples"] == 4 and row["diversity"] == pytest.approx(0.25)
    assert row["fidelity_share"] == 0.25 and row["fidelity_gain"] == pytest.approx((0 + 1 - 1 + 4e-10) / 4)
    assert row["fidelity_synergy"] == pytest.approx(0.5 / 4 + 1e-10)
    assert (row["fidelity_share_low"], row["fidelity_share_high"]) == pytest.approx(wilson_interval(1, 4))
    assert row["mixing_time_share"] == 0.25 and row["mixing_time_gain"] == pytest.approx((1 - 1 + 0 + 0) / 4)
    assert "mixing_time_synergy" not in row


def test_draws_reproduce_from_their_seed():
    cell = lambda seed, share=0.5: amplification.cell_values("dense", 8, 2, share, QUICK, seed=seed, spread=0.05)
    assert cell(3) == cell(3) and cell(3) != cell(4) and cell(3) != cell(3, share=0.0)
    assert torch.equal(draws("sparse", 0.5, seed=1), draws("sparse", 0.5, seed=1))


def test_place_on_map_by_hand():
    """A trained layer gets the random share interpolated at its diversity along the curve of its head count and n;
    NaN outside the curve or without one."""
    curve = pd.DataFrame({"family": "dense", "n": 100, "heads": 4, "diversity": [0.0, 0.4, 0.8],
                          "fidelity_share": [0.0, 0.2, 0.6]})
    table = pd.concat([curve, curve.assign(family="sparse", fidelity_share=[0.0, 0.5, 0.9])])
    trained = pd.DataFrame({"run": "0", "heads": [4, 4, 16, 4, 4, 4], "n": 100,
                            "diversity": [0.6, 0.1, 0.5, 0.9, 0.0, 0.8], "fidelity_share": 0.5})
    placed = amplification.place_on_map(trained, table)
    assert placed.random_dense_share.tolist()[:2] == pytest.approx([0.4, 0.05])
    assert placed.random_sparse_share.tolist()[:2] == pytest.approx([0.7, 0.125])
    assert placed.random_dense_share[2:4].isna().all()
    # exactly at the curve's two ends: on it
    assert placed.random_dense_share.tolist()[4:] == [0.0, 0.6] and placed.random_sparse_share.tolist()[4:] == [0.0, 0.9]


def test_amplification_script_quick_end_to_end(tmp_path, run_ok, run_main):
    """In two worker processes: cells and trained layers recomputed here give the same rows (the cells are seeded by
    themselves, the trained layers read from the same checkpoints)."""
    out = run_ok("theory.py", "--quick", "--amplification", "--heads", 4, "--tasks", "cycle", "--jobs", 2,
                 "--ckpt-dir", tmp_path / "ckpt", "--out", tmp_path)
    assert "beats its best head" in out
    folder = tmp_path / "theory"
    table, trained = pd.read_csv(folder / "amplification.csv"), pd.read_csv(folder / "amplification_trained.csv")
    assert len(table) == len(graphs.FAMILIES) * 2 * 2 * len(SHARE_LEVELS)
    assert (table[table.share == 1.0].fidelity_share == 0).all() and (table[table.share == 1.0].diversity == 0).all()
    assert len(trained) == QUICK.num_layers and set(trained.heads) == {4}
    model = load_model(QUICK, 4, tmp_path / "ckpt" / "4_heads_cycle.pt", "cpu")[0]  # the worker's rows, here
    here = pd.DataFrame(layer_amplification_rows({(4, "cycle"): model}, QUICK, 42))
    pd.testing.assert_frame_equal(trained.drop(columns=["run", "random_sparse_share", "random_dense_share"]), here,
                                  check_dtype=False, rtol=1e-12)
    spread = trained.weight_log_spread.max()
    for row in table.iloc[[3, 7, 16]].itertuples():
        again = amplification.cell_values(row.family, row.n, row.heads, row.share, QUICK, seed=42, spread=spread)
        assert again == pytest.approx({k: getattr(row, k) for k in again}, rel=1e-12)
    markdown = (folder / "amplification.md").read_text()
    assert "worked argument" in markdown and "## Findings" in markdown and "trained layers on the map" in markdown
    for ext in ("png", "pdf"):
        assert (folder / f"amplification.{ext}").stat().st_size > 500
    code, _, err = run_main("theory.py", "--amplification", "--seeds", 0)
    assert code == 2 and "cannot be combined with --seeds" in err


def test_first_crossing_by_hand():
    x, y = np.array([0.0, 0.2, 0.4, 0.6]), np.array([0.0, 0.4, 0.6, 0.45])
    assert amplification._first_crossing(x, y, 0.5) == pytest.approx(0.3)  # between 0.2 and 0.4, the first time only
    assert amplification._first_crossing(x, y, 0.0) == 0.0 and math.isnan(amplification._first_crossing(x, y, 0.7))
