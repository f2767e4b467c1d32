"""The seed study: the across-run summary against hand-worked numbers, the claims on constructed tables whose
answers are known, and --seeds end to end on quick checkpoints of several runs (a missing cell named, not hidden)."""
import argparse
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CROSS_MACHINE_ATOL, ROOT, same_on_any_cpu

from checkpoints import build_model, load_model, save_checkpoint
from claims import count_claims
from config import AUTHORS, HEADS, PAPER, QUICK, TASKS
from evaluation import SECTION4_PROXIES, section4_rows, synergy_rows, tables56_rows, theory_rows
from runs import Run, across_runs, evaluate_runs
from script_io import add_evaluation_args, resolve_evaluation


def test_across_runs_by_hand():
    per_run = pd.DataFrame({"run": ["0", "1", "2", "3", AUTHORS, "0"], "task": ["copy"] * 5 + ["cycle"],
                            "x": [3.0, 6.0, 1.0, 2.0, 100.0, 5.0]})  # unsorted: min and max are not the ends
    table = across_runs(per_run, ["task"], {"x_label": "x"}).set_index("task")
    copy = table.loc["copy"]
    # mean 3; squared deviations 4 + 1 + 0 + 9 = 14, std = sqrt(14 / 3); t(0.975, df 3) = 3.182446305
    half = 3.182446305 * np.sqrt(14 / 3) / 2
    assert copy.n_runs == 4 and copy.runs == "0 1 2 3" and copy.quantity == "x_label"
    assert copy["mean"] == pytest.approx(3.0) and copy["std"] == pytest.approx(np.sqrt(14 / 3))
    assert copy.ci_low == pytest.approx(3 - half, rel=1e-8) and copy.ci_high == pytest.approx(3 + half, rel=1e-8)
    assert (copy["min"], copy["max"], copy.authors) == (1.0, 6.0, 100.0)  # the authors' beside, never pooled
    cycle = table.loc["cycle"]  # one run: no spread to speak of
    assert cycle.n_runs == 1 and cycle["mean"] == 5.0 and np.isnan(cycle["std"]) and np.isnan(cycle.ci_low)
    assert np.isnan(cycle.authors)


def test_across_runs_with_several_keys_and_the_authors():
    """Every real table groups by several keys: the authors' value is filled per group, never counted in n_runs."""
    per_run = pd.DataFrame([{"run": run, "task": task, "heads": heads, "layer": layer, "x": x, "y": -x}
                            for run, offset in (("1", 0.0), ("0", 10.0), (AUTHORS, 100.0))
                            for task, heads, layer, x in (("copy", 4, 1, 1.0), ("copy", 4, 2, 2.0),
                                                          ("cycle", 8, 1, 3.0)) for x in [x + offset]])
    table = across_runs(per_run, ["task", "heads", "layer"], {"x": "x", "y": "y"})
    assert list(table.n_runs) == [2] * 6 and set(table.runs) == {"1 0"}
    assert list(table.authors) == [101.0, -101.0, 102.0, -102.0, 103.0, -103.0]
    assert list(table["min"]) == [1.0, -11.0, 2.0, -12.0, 3.0, -13.0]
    assert list(table["max"]) == [11.0, -1.0, 12.0, -2.0, 13.0, -3.0]
    assert list(table["mean"]) == [6.0, -6.0, 7.0, -7.0, 8.0, -8.0]


def test_evaluate_runs_labels_each_run_by_name_and_evaluates_it_with_its_seed(tmp_path):
    """The authors' run has the paper's seed 42 but its own label, so it is never pooled with our seed-42 run."""
    runs = [Run("42", 42, tmp_path / "ours"), Run("7", 7, tmp_path / "seven"), Run(AUTHORS, 42, tmp_path / "theirs")]
    for number, run in enumerate(runs):
        torch.manual_seed(number)
        save_checkpoint(run.folder / "4_heads_copy.pt", build_model(QUICK, 4).state_dict())
    rows_of = lambda models, seed: [{"seed": seed, "weight": float(models[4, "copy"].token_emb.weight[0, 0].detach())}]
    table = evaluate_runs(QUICK, [(4, "copy")], runs, "cpu", rows_of)
    assert list(table.run) == ["42", "7", AUTHORS] and list(table.seed) == [42, 7, 42]
    assert table.weight.nunique() == 3  # each run's own checkpoint
    with pytest.raises(ValueError, match="no checkpoint of 4_heads_cycle"):
        evaluate_runs(QUICK, [(4, "cycle")], runs, "cpu", rows_of)


def section4_run(run, mixing, fidelity):
    """A constructed per-run Section 4 table: mixing[heads] and fidelity[heads] are per-layer lists, copy task."""
    return [{"run": run, "task": task, "heads": h, "layer": layer + 1, "mixing_time_mean": mixing[h][layer],
             "fidelity_mean": fidelity[h][layer]} for task in ("copy", "cycle") for h in mixing
            for layer in range(len(mixing[h]))]


def test_section4_claims_on_constructed_runs():
    # Run "a": the paper's picture (1 head slowest, fidelity rising, last layer poorest, layer 1 under 4 steps).
    a = section4_run("a", {1: [3.9, 40, 60], 4: [3.8, 5, 45], 16: [3.7, 4, 50]},
                     {1: [0.1, 0.0, 0.0], 4: [0.3, 0.2, 0.0], 16: [0.5, 0.4, 0.01]})
    # Run "b": 4 heads slower than 1 in layer 2, fidelity not rising in layer 1, the 16-head last layer fast.
    b = section4_run("b", {1: [3.9, 40, 60], 4: [3.8, 41, 45], 16: [3.7, 4, 3.9]},
                     {1: [0.1, 0.0, 0.0], 4: [0.6, 0.2, 0.0], 16: [0.5, 0.4, 0.3]})
    authors = section4_run(AUTHORS, {1: [3.0, 40, 60], 4: [3.8, 5, 45], 16: [3.7, 4, 50]},
                           {1: [0.1, 0.0, 0.0], 4: [0.3, 0.2, 0.0], 16: [0.5, 0.4, 0.01]})
    claims = count_claims({"section4": pd.DataFrame(a + b + authors)}).set_index(["claim", "task", "heads", "layer"])
    one_head = claims.loc["one_head_mixes_slowest"]
    assert list(one_head.loc["copy", "1 vs all"].runs_holding) == [2, 1, 2]  # layer 2: 41 > 40 in b
    assert one_head.loc[("copy", "1 vs all", "2"), "holding"] == "a"
    assert one_head.loc[("copy", "1 vs all", "2"), "authors_holds"] == True  # noqa: E712 (a numpy bool)
    assert one_head.loc[("copy", "1 vs all", "1"), "authors_holds"] == False  # noqa: E712 (3.0 < 3.8: theirs fails)
    rises = claims.loc["fidelity_rises_with_heads"]
    assert list(rises.loc["copy", "all"].runs_holding) == [1, 2, 0] and (rises.runs == 2).all()  # layer 3: 0 = 0
    last = claims.loc["last_cycle_layer_poorest_both"].loc["cycle"]
    assert last.loc[("1", "last"), "runs_holding"] == 2 and last.loc[("16", "last"), "runs_holding"] == 1
    assert claims.loc[("layer1_mixes_under_4_steps", "copy", "1", "1"), "runs_holding"] == 2
    collapse = claims.loc["cycle_deep_layer_collapses"].loc["cycle"]
    assert collapse.loc[("4", ">= 3"), "runs_holding"] == 2 and collapse.loc[("16", ">= 3"), "runs_holding"] == 1


def test_amplification_and_synergy_claims_on_constructed_runs():
    amp = pd.DataFrame([  # run, layer, sample-0 amplification, wins, ties, samples, p
        {"run": r, "task": "copy", "heads": 4, "layer": layer, "amplification": amp, "wins": w, "ties": t,
         "samples": 50, "p_value": p} for r, layer, amp, w, t, p in
        [("0", 1, True, 40, 0, 1e-5), ("0", 2, False, 10, 0, 1e-5), ("1", 1, True, 26, 0, 0.9),
         ("1", 2, True, 30, 10, 0.03)]])  # run 1 layer 2: 30 of 40 decided, p < 0.05: a majority
    syn = pd.DataFrame([
        {"run": r, "task": "cycle", "heads": 8, "layer": 1, "proxy": proxy, "synergy": s, "p_value": p,
         "gain_over_best": g, "gain_over_best_p": gp, "diversity": 0.5} for r, proxy, s, p, g, gp in
        [("0", "fidelity", 0.01, 0.01, 0.02, 0.001), ("0", "mixing_time", -0.2, 0.001, -1.0, 0.001),
         ("1", "fidelity", 0.01, 0.2, -0.02, 0.001), ("1", "mixing_time", 0.3, 0.04, -1.0, 0.3)]])
    claims = count_claims({"tables56": amp, "synergy": syn}).set_index(["claim", "layer"])
    count = lambda claim, layer: tuple(claims.loc[(claim, str(layer)), ["runs_holding", "runs"]])
    assert count("combination_beats_best_head_one_sequence", 1) == (2, 2)
    assert count("combination_beats_best_head_one_sequence", 2) == (1, 2)
    assert count("combination_wins_majority", 1) == (1, 2) and count("combination_wins_majority", 2) == (1, 2)
    assert count("combination_loses_majority", 2) == (1, 2) and claims.loc[("combination_loses_majority", "2"),
                                                                           "holding"] == "0"
    assert count("synergy_positive_fidelity", 1) == (1, 2) and count("synergy_negative_fidelity", 1) == (0, 2)
    assert count("synergy_positive_mixing_time", 1) == (1, 2) and count("synergy_negative_mixing_time", 1) == (1, 2)
    assert count("best_head_mixes_faster", 1) == (1, 2) and count("combination_beats_best_head_fidelity", 1) == (1, 2)
    assert (claims.authors_holds == "").all()  # no authors' run given
    assert "diversity_goes_with_synergy_fidelity" not in claims.index.get_level_values(0)  # 1 layer: no correlation


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_seeds_end_to_end_on_quick_runs(tmp_path, run_ok):
    """Training in its own process; the evaluation scripts in this one (run_ok), as the command line runs them."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    run("train.py", "--quick", "--heads", 1, 4, "--seeds", 0, 1, 42, "--ckpt-dir", ckpt)
    (ckpt / "seeds" / "seed_42").rename(tmp_path / "r42")  # seed 42's run lives in CKPT_DIR itself
    for path in (tmp_path / "r42").iterdir():
        path.rename(ckpt / path.name)
    (ckpt / "seeds" / "seed_1" / "4_heads_cycle.pt").unlink()  # seed 1 incomplete; seed 7 has no folder at all
    run_ok("main.py", "--quick", "--heads", 1, 4, "--ckpt-dir", ckpt / "seeds" / "seed_0", "--seed", 0,
           "--out", tmp_path / "single")
    runs = ("--quick", "--ckpt-dir", ckpt, "--out", out)  # no authors' run with --quick
    text = run_ok("main.py", *runs, "--heads", 1, 4, "--seeds", 0, 1, 7)
    assert "complete: 42, 0;" in text and "5 cell(s) missing" in text
    assert "seed_1/4_heads_cycle.pt" in text and "seed_7/1_heads_copy.pt" in text
    per_run = pd.read_csv(out / "seeds" / "section4_runs.csv", dtype={"run": str})
    assert list(per_run.run.unique()) == ["42", "0", "1"] and len(per_run) == (3 * 4 - 1) * 2
    # a run's rows are what the one-run command gives for that seed, to the last digit
    single = pd.read_csv(tmp_path / "single" / "section4.csv")
    mine = per_run[per_run.run == "0"].drop(columns="run").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, single)
    across = pd.read_csv(out / "seeds" / "section4_across_runs.csv")
    cell = across[(across.task == "copy") & (across.heads == 4) & (across.layer == 2) & (across.proxy == "fidelity")]
    values = per_run[(per_run.task == "copy") & (per_run.heads == 4) & (per_run.layer == 2)].fidelity_mean
    assert int(cell.n_runs.iloc[0]) == 3 and cell["mean"].iloc[0] == pytest.approx(values.mean())
    assert cell["std"].iloc[0] == pytest.approx(values.std(ddof=1))
    assert int(across[(across.task == "cycle") & (across.heads == 4)].n_runs.iloc[0]) == 2
    run_ok("test_amplification.py", *runs, "--heads", 4, "--seeds", 0, 1, "--samples", 5)
    run_ok("synergy.py", *runs, "--heads", 4, "--seeds", 0, 1)
    run_ok("theory.py", *runs, "--heads", 4, "--seeds", 0, 1)
    # run 0's Tables 5-6, synergy and theory rows, p-values included, are the one-run evaluation's for seed 0
    models = {(4, t): load_model(QUICK, 4, ckpt / "seeds" / "seed_0" / f"4_heads_{t}.pt", "cpu")[0] for t in TASKS}
    theory = theory_rows(models, QUICK, 0)
    for stem, rows in (("tables56", tables56_rows(models, QUICK, 5, 0)), ("synergy", synergy_rows(models, QUICK, 0)),
                       ("theorem29", theory["theorem29"]), ("prefix", theory["prefix"])):
        mine = pd.read_csv(out / "seeds" / f"{stem}_runs.csv", dtype={"run": str})
        mine = mine[mine.run == "0"].drop(columns="run").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, pd.DataFrame(rows), check_dtype=False)
    for name in ("section4_runs.png", "section4_runs.pdf", "synergy_runs.png", "tables56_runs.md",
                 "tables56_across_runs.md", "synergy_across_runs.md", "claims.md", "theorem29_across_runs.md",
                 "prefix_runs.png", "growth_runs.csv"):
        assert (out / "seeds" / name).stat().st_size > 500, name
    claims = pd.read_csv(out / "seeds" / "claims.csv")
    assert {"one_head_mixes_slowest", "combination_wins_majority", "synergy_positive_fidelity",
            "best_head_mixes_faster", "theorem29_bound_holds", "mixing_grows_like_log_n"} <= set(claims.claim)
    # a claim counted by hand from the per-run table: layer 1 under 4 steps, in how many of the runs with the cell
    under_4 = claims[claims.claim == "layer1_mixes_under_4_steps"]
    by_hand = [(task, heads, int((x < 4).sum()), len(x)) for (task, heads), x in
               per_run[per_run.layer == 1].groupby(["task", "heads"], sort=False).mixing_time_mean]
    assert list(zip(under_4.task, under_4.heads.astype(int), under_4.runs_holding, under_4.runs)) == by_hand
    assert [runs for *_, runs in by_hand] == [3, 3, 3, 2]  # seed 1 lacks 4_heads_cycle
    fresh = claims[claims.claim == "combination_beats_best_head_one_sequence"]
    tables = pd.read_csv(out / "seeds" / "tables56_runs.csv", dtype={"run": str})
    wins = tables.groupby(["task", "heads", "layer"]).amplification.sum()
    assert list(fresh.runs_holding) == list(wins.loc[list(zip(fresh.task, fresh.heads.astype(int),
                                                                   fresh.layer.astype(int)))])


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0", "--official"], "cannot be combined with --official"),
    (["--seeds", "0", "42"], "repeated: 42"),
    (["--seeds", "3", "3"], "repeated: 3"),
])
def test_bad_seeds_flags(args, message, capsys):
    parser = argparse.ArgumentParser(prog="main.py")
    add_evaluation_args(parser, (4,))
    with pytest.raises(SystemExit) as exit_status:
        resolve_evaluation(parser, parser.parse_args(args))
    assert exit_status.value.code == 2 and message in capsys.readouterr().err


SEED_RESULTS = ROOT / "results" / "seeds"
needs_seed_results = pytest.mark.skipif(not (SEED_RESULTS / "section4_runs.csv").is_file(),
                                        reason="no committed results/seeds/")


def committed(name):
    return pd.read_csv(SEED_RESULTS / name, dtype={"run": str}, keep_default_na=False)


def _agree_with_the_one_run_tables(tables, run, folder):
    """The run's rows of tables56_runs and synergy_runs are its one-run tables in `folder`, every column the claims
    read included (counts exactly, the rest within the cross-machine tolerance)."""
    one_run = {"tables56": pd.concat([pd.read_csv(folder / f"{name}.csv") for name in ("table5_copy", "table6_cycle")]),
               "synergy": pd.read_csv(folder / "synergy.csv")}
    for table, single in one_run.items():
        mine = tables[table][tables[table].run == run].drop(columns="run")
        if run == AUTHORS and mine.empty:
            continue
        keys = ["task", "heads", "layer"] + (["proxy"] if table == "synergy" else [])
        mine, single = (t.sort_values(keys).reset_index(drop=True) for t in (mine, single))
        assert list(mine.columns) == list(single.columns) and len(mine) == len(single) > 0
        exact = [c for c in mine.columns if c in keys or c in ("amplification", "wins", "ties", "samples")]
        pd.testing.assert_frame_equal(mine[exact], single[exact], check_dtype=False)
        p_values = [c for c in mine.columns if c in ("p_value", "gain_over_best_p")]  # from ranks: see test_evaluation
        assert np.allclose(mine[p_values], single[p_values], rtol=0.05, atol=1e-6), (table, run)
        close = [c for c in mine.columns if c not in exact + p_values]
        assert same_on_any_cpu(mine[close], single[close], atol=CROSS_MACHINE_ATOL), (table, run)


@needs_seed_results
def test_committed_seed_results_agree_with_each_other_and_with_the_one_run_results():
    per_run = committed("section4_runs.csv")
    values = [c for c in per_run.columns if c.endswith(("_mean", "_std"))]
    for run, one_run in (("42", ROOT / "results" / "section4.csv"),
                         (AUTHORS, ROOT / "results" / "official" / "section4.csv")):
        mine = per_run[per_run.run == run].drop(columns="run").reset_index(drop=True)
        if run == AUTHORS and mine.empty:
            continue
        single = pd.read_csv(one_run)
        assert (mine[["task", "heads", "layer"]].values == single[["task", "heads", "layer"]].values).all()
        assert same_on_any_cpu(mine[values].astype(float), single[values], atol=CROSS_MACHINE_ATOL)
    across = across_runs(per_run.assign(**{c: per_run[c].astype(float) for c in values}),
                         ["task", "heads", "layer"], SECTION4_PROXIES, name="proxy")
    stored = committed("section4_across_runs.csv")
    assert np.allclose(across["mean"], stored["mean"].astype(float)) and (across.n_runs == stored.n_runs).all()
    tables = {"section4": per_run.assign(**{c: per_run[c].astype(float) for c in values}),
              "tables56": pd.read_csv(SEED_RESULTS / "tables56_runs.csv", dtype={"run": str}),
              "synergy": pd.read_csv(SEED_RESULTS / "synergy_runs.csv", dtype={"run": str}),
              "theorem29": pd.read_csv(SEED_RESULTS / "theorem29_runs.csv", dtype={"run": str}),
              "prefix": pd.read_csv(SEED_RESULTS / "prefix_runs.csv", dtype={"run": str})}
    for run, folder in (("42", ROOT / "results"), (AUTHORS, ROOT / "results" / "official")):
        _agree_with_the_one_run_tables(tables, run, folder)
    one_run = pd.read_csv(ROOT / "results" / "theory" / "theorem29.csv")  # seed 42's theory table, run 42's rows
    mine = tables["theorem29"][tables["theorem29"].run == "42"].drop(columns="run").reset_index(drop=True)
    assert list(mine.columns) == list(one_run.columns) and len(mine) == len(one_run) == 32
    assert np.allclose(mine.select_dtypes(float), one_run.select_dtypes(float), rtol=1e-6, atol=CROSS_MACHINE_ATOL)
    claims, stored = count_claims(tables), committed("claims.csv")
    assert list(claims.claim) == list(stored.claim)
    assert list(claims.runs_holding) == list(stored.runs_holding) and list(claims.runs) == list(stored.runs)


@needs_seed_results
def test_committed_seed_runs_reproduce_from_their_checkpoints():
    """Every seed run in results/seeds/section4_runs.csv is what its committed checkpoints give (cross-machine
    tolerance), evaluated as the one-run protocol does for that seed: two cells a seed, in turn, so that the runs
    together cover every head count and task (seed 42's own are test_evaluation's)."""
    per_run = committed("section4_runs.csv")
    seeds = sorted({run for run in per_run.run if run not in ("42", AUTHORS)})
    assert seeds, "results/seeds/ holds no seed run"
    grid = [(h, t) for t in TASKS for h in HEADS]
    for k, seed in enumerate(seeds):
        folder = ROOT / "checkpoints" / "seeds" / f"seed_{seed}"
        cells = sorted([grid[(2 * k) % len(grid)], grid[(2 * k + 5) % len(grid)]], key=grid.index)  # table order
        models = {(h, t): load_model(PAPER, h, folder / f"{h}_heads_{t}.pt", "cpu")[0] for h, t in cells}
        fresh = pd.DataFrame(section4_rows(models, PAPER, int(seed)))
        in_cells = np.array([(h, t) in cells for h, t in zip(per_run.heads.astype(int), per_run.task)])
        mine = per_run[(per_run.run == seed).to_numpy() & in_cells]
        mine = mine.drop(columns="run").reset_index(drop=True)
        values = [c for c in fresh.columns if c.endswith(("_mean", "_std"))]
        assert (mine[["task", "heads", "layer"]].values == fresh[["task", "heads", "layer"]].values).all()
        assert same_on_any_cpu(mine[values].astype(float), fresh[values], atol=CROSS_MACHINE_ATOL)
