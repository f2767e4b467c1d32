"""The README's and docs' numbers come out of the committed results: the README's claims table equals the one
claims.py computes from results/seeds/claims.csv, the seed study's tables all hold the same runs, the numbers of
theory.md, findings.md and speed.md are their files', and the README fits a first read."""
import re

import pandas as pd
from conftest import ROOT, markdown_frame, markdown_tables

from claims import claims_overview

README = (ROOT / "README.md").read_text()
SEEDS = ROOT / "results" / "seeds"


def readme_claims_table():
    """The README's claims table: its header's run count and {claim: [source, instances, every, some, none,
    authors']} from its rows."""
    claims = markdown_frame(next(t for t in markdown_tables(README) if t.startswith("| claim | source |")))
    runs = int(next(column for column in claims.columns if column.startswith("in all ")).split()[2])
    return runs, {row[0].strip("`"): list(row[1:]) for row in claims.itertuples(index=False)}


def test_the_readme_claims_table_is_the_committed_claims_table():
    overview = claims_overview(pd.read_csv(SEEDS / "claims.csv", keep_default_na=False))
    runs, rows = readme_claims_table()
    assert set(overview.runs) == {runs}
    assert list(rows) == list(overview.claim)
    for r in overview.itertuples(index=False):
        assert rows[r.claim] == [r.source, str(r.instances), str(r[4]), str(r[5]), str(r[6]), r[7]], r.claim


def test_every_study_of_the_seed_folder_holds_the_same_runs():
    """A claims table over studies of different runs would count each claim over other runs: every per-run table
    of results/seeds, and every claim's study_runs, name the same runs in the same order."""
    tables = sorted(path for path in SEEDS.glob("*_runs.csv") if not path.name.endswith("_across_runs.csv"))
    assert len(tables) >= 6
    runs = {path.name: " ".join(dict.fromkeys(pd.read_csv(path, dtype={"run": str}).run)) for path in tables}
    assert len(set(runs.values())) == 1, runs
    claims = pd.read_csv(SEEDS / "claims.csv", dtype={"study_runs": str})
    assert set(claims.study_runs) == set(runs.values())
    ours = " ".join(run for run in next(iter(runs.values())).split() if run != "authors")
    for path in SEEDS.glob("*_across_runs.csv"):  # the summaries over runs: over ours, all of them, in every row
        assert set(pd.read_csv(path, dtype={"runs": str}).runs) == {ours}, path.name
    assert "Every study over the same runs" in (SEEDS / "claims.md").read_text()


def test_the_readme_fits_a_first_read_and_names_the_commands():
    assert len(README) <= 12_000
    for command in ("python main.py", "python example2.py", "python test_amplification.py", "python synergy.py",
                    "python theory.py", "python -m pytest", "--with-authors"):
        assert command in README, command


def test_theory_docs_numbers_are_the_files():
    """docs/theory.md's Theorem 2.9 numbers against results/seeds/theorem29_runs.csv: the bound's looseness (3.8x to
    516x, the two line-like layers off 4x), N p > ln 8 in 161 of 192 layer-runs and where it fails."""
    theory = (ROOT / "docs" / "theory.md").read_text()
    t = pd.read_csv(SEEDS / "theorem29_runs.csv", dtype={"run": str})
    t = t[t.run != "authors"]
    ratio = t.bound_over_measured
    assert f"{ratio.min():.1f}× to {ratio.max():.0f}×" == "3.8× to 516×" and "3.8× to 516×" in theory
    line_like = t[(t.task == "cycle") & ((t.heads == 1) | (t.layer == 4))].set_index(["run", "heads", "layer"])
    off = line_like[(line_like.bound_over_measured - 3.9).abs() > 0.15].bound_over_measured.round(1).to_dict()
    assert off == {("2", 1, 1): 9.1, ("0", 8, 4): 5.4}
    assert "seed 2's 1-head layer 1 (9.1×) and seed 0's 8-head last layer (5.4×)" in theory
    failing = t[t.rigorous_share < 1].groupby(["task", "heads", "layer"]).size().to_dict()
    assert failing == {("copy", 1, 1): 3, ("copy", 1, 2): 6, ("copy", 1, 3): 6, ("copy", 1, 4): 6,
                       ("copy", 4, 3): 4, ("copy", 4, 4): 6}
    assert f"holds in every sequence in {(t.rigorous_share == 1).sum()} of the {len(t)} layer-runs" in theory
    graphs = pd.read_csv(ROOT / "results" / "theory" / "graphs.csv")
    worst = graphs[(graphs.graph == "line") & (graphs.n == 16)].mixing_time_worst.item()
    assert worst == 35 and "44 ≥ the measured 36" in theory and "reports 35, one" in theory


PRETRAINED = ROOT / "results" / "pretrained"


def _cells(summary, model, first, column, form="{}"):
    """One summary column over repeat, prose and code, as the findings write it: "5, 3, 2"."""
    return ", ".join(form.format(summary[(summary.model == model) & (summary.input == kind)
                                         & (summary.first_token == first)][column].item())
                     for kind in ("repeat", "prose", "code"))


def test_real_model_findings_are_the_files():
    """docs/findings.md's real-model counts against results/pretrained/summary.csv: the verdicts and their Holm
    counts, growth and its exponent, both sink scores, the variant without position 0; and the sink protocol's."""
    findings = (ROOT / "docs" / "findings.md").read_text()
    flat = " ".join(findings.split())
    summary = pd.read_csv(PRETRAINED / "summary.csv")
    cells = lambda model, column, first=True, form="{}": _cells(summary, model, first, column, form)
    for model, name in (("smollm2", "SmolLM2"), ("gemma3-270m", "Gemma")):
        assert (f"wins in {cells(model, 'wins')}{' layers' if name == 'SmolLM2' else ''} (Holm: "
                f"{cells(model, 'wins_holm')}); loses in {cells(model, 'losses')} (Holm: "
                f"{cells(model, 'losses_holm')})") in flat, name
        signs = lambda suffix: zip(cells(model, f"synergy_positive{suffix}").split(", "),
                                   cells(model, f"synergy_negative{suffix}").split(", "))
        pairs = lambda suffix: ", ".join(f"{a} / {b}" for a, b in signs(suffix))
        assert f"{pairs('')} (Holm: {pairs('_holm')})" in flat, name
        assert f"log in {cells(model, 'growth_log')}" in flat, name
        assert cells(model, "beta_median", form="{:.2f}") in flat, name
        rows = summary[(summary.model == model) & summary.first_token]
        assert f"({rows.beta_min.min():.2f}–{rows.beta_max.max():.2f})" in flat, name
        assert (rows.beta_excludes_0 == rows.layers).all() and (rows.beta_excludes_1 == rows.layers).all()
        assert cells(model, "sink_share", form="{:.0%}") in flat, name
    gemma = lambda column: cells("gemma3-270m", column, form="{:.0%}")
    assert f"{gemma('sink_share_visible')} ({gemma('sink_share_full')}; {gemma('sink_share_sliding')})" in flat
    without = lambda model, column: cells(model, column, first=False)
    assert f"SmolLM2 wins in {without('smollm2', 'wins')} layers and loses in {without('smollm2', 'losses')}" in flat
    assert f"Gemma wins in {without('gemma3-270m', 'wins')} and loses in {without('gemma3-270m', 'losses')}" in flat
    assert (summary.bound_holds == summary.layers).all()
    sink = pd.read_csv(PRETRAINED / "sink_protocol" / "summary.csv").set_index(["model", "input"])
    share = lambda model, kind: f"{100 * sink.loc[(model, kind), 'sink_share']:.1f}%"
    assert f"prose {share('smollm2', 'prose')} (SmolLM2) and {share('gemma3-270m', 'prose')} (Gemma)" in flat
    assert f"tokens {share('smollm2', 'random')} and {share('gemma3-270m', 'random')}" in flat
    assert f"repeated {share('smollm2', 'one-token')} (SmolLM2" in flat


def test_gradient_findings_are_the_files():
    """The gradient study's table in docs/findings.md: recency's and rollout's rho with their intervals, each layer's
    reach (median and range) and the layers whose reach beats recency after Holm's correction (claims.holm over the
    committed per-layer Wilcoxon p-values)."""
    from claims import holm
    flat = " ".join((ROOT / "docs" / "findings.md").read_text().split())
    interval = lambda r: (f"{r.rho_mean:.2f} ({r.rho_ci_low:.2f}–{r.rho_ci_high:.2f})" if r.rho_ci_low >= 0 else
                          f"{r.rho_mean:.2f} ({r.rho_ci_low:.2f} to {r.rho_ci_high:.2f})").replace("-", "−")
    for model in ("smollm2", "gemma3-270m"):
        tables = [pd.read_csv(PRETRAINED / "gradient" / model / kind / "gradient.csv") for kind in ("prose", "code")]
        tables = [t[t.positions == "after_first"].set_index("predictor") for t in tables]
        for predictor in ("recency", "rollout"):
            assert ", ".join(interval(t.loc[predictor]) for t in tables) in flat, (model, predictor)
        reach = [t[t.index.str.startswith("reach_")] for t in tables]
        spans = ", ".join(f"{r.rho_mean.median():.2f} ({r.rho_mean.min():.2f}–{r.rho_mean.max():.2f})"
                          .replace("-", "−") for r in reach)
        assert spans in flat, model
        beats = [int(((r.over_recency > 0) & (holm(r.over_recency_p.to_numpy()) < 0.05)).sum()) for r in reach]
        assert f"{beats[0]} and {beats[1]} of {len(reach[0])}" in flat, model


def test_quantisation_findings_are_the_files():
    """The quantisation table of docs/findings.md: each row from results/pretrained/quantisation/summary.csv (two
    significant digits), the Q4_0 flips counted from each model's flips.csv."""
    findings = (ROOT / "docs" / "findings.md").read_text()
    q = pd.read_csv(PRETRAINED / "quantisation" / "summary.csv")
    row = lambda model, column, scale=100, unit="%": ", ".join(
        f"{scale * v:.2g}{unit}" for v in q[q.model == model].set_index("quantiser").loc[["Q8_0", "Q5_0", "Q4_0"],
                                                                                        column])
    cells = lambda column, **form: f"| {row('smollm2', column, **form)} | {row('gemma3-270m', column, **form)} |"
    assert "| weights' RMS relative change " + cells("weights_rms_change") in findings
    assert cells("kl_mean", scale=1, unit="") in findings
    assert cells("section4.fidelity_mean_median_abs_change") in findings
    for model in ("smollm2", "gemma3-270m"):
        assert f"{row(model, 'section4.mixing_time_mean_median_abs_change')}; " \
               f"{row(model, 'prefix.beta_median_abs_change')} |" in findings
    flips = {m: pd.read_csv(PRETRAINED / "quantisation" / m / "prose" / "flips.csv") for m in ("smollm2", "gemma3-270m")}
    layers = {"smollm2": 30, "gemma3-270m": 18}
    counted = {m: [int(f[(f.quantiser == "Q4_0") & (f.verdict == v)].flipped.sum()) for v in (
        "beats its best head in most samples", "fidelity synergy > 0", "grows like log n", "bound holds in every sample")]
        for m, f in flips.items()}
    assert " | ".join(f"{', '.join(map(str, counted[m]))} of {layers[m]}" for m in flips) in findings
    sinks = {m: f[(f.quantiser == "Q4_0") & (f.verdict == "sink head (Gu et al.)")] for m, f in flips.items()}
    assert " | ".join(f"{int(s.flipped.sum())} of {len(s)}" for s in sinks.values()) in findings


def test_the_readmes_real_model_line_is_the_files():
    """The README's real-model results: Holm-corrected wins and losses, the exponent's range, the layers whose reach
    beats recency and Q4_0's fidelity change, each from the committed CSVs."""
    from claims import holm
    flat = " ".join(README.split())
    summary = pd.read_csv(PRETRAINED / "summary.csv")
    paper = summary[summary.first_token]
    assert f"at most {paper.wins_holm.max()} of 18–30 layers, loses in {paper.losses_holm.min()}–" \
           f"{paper.losses_holm.max()}" in flat
    assert f"n^{paper.beta_min.min():.2f}–{paper.beta_max.max():.2f}" in flat
    beats = []
    for folder in (PRETRAINED / "gradient").glob("*/*/gradient.csv"):
        t = pd.read_csv(folder)
        reach = t[(t.positions == "after_first") & t.predictor.str.startswith("reach_")]
        beats.append(int(((reach.over_recency > 0) & (holm(reach.over_recency_p.to_numpy()) < 0.05)).sum()))
    assert len(beats) == 4 and f"in {min(beats)}–{max(beats)} of 18–30 layers" in flat
    q = pd.read_csv(PRETRAINED / "quantisation" / "summary.csv")
    change = 100 * q[q.quantiser == "Q4_0"]["section4.fidelity_mean_median_abs_change"]
    assert f"moves fidelity {change.min():.0f}–{change.max():.0f}%" in flat


def test_speed_doc_is_the_bench_reports():
    """docs/speed.md's tables are those of results/bench_cpu.md and bench_cuda.md, and the ratios and hours its text
    quotes are computed here from the CPU report's tables."""
    speed = (ROOT / "docs" / "speed.md").read_text()
    cpu = (ROOT / "results" / "bench_cpu.md").read_text()
    reports = markdown_tables(cpu) + markdown_tables((ROOT / "results" / "bench_cuda.md").read_text())
    assert len(markdown_tables(speed)) == 5 and all(table in reports for table in markdown_tables(speed))
    assert cpu.startswith("# Benchmark on AMD EPYC") and "On a 2-core AMD EPYC" in speed

    frames = [markdown_frame(table) for table in markdown_tables(cpu)[:3]]
    step, layer, schedules = (frame.set_index(frame.columns[0]) for frame in frames)
    step, layer = step.astype(float), layer.astype(float)
    fast = step["fast ms/step"]
    quoted = [f"costs {fast['16'] / fast['1']:.2f}× a 1-head step",
              f"is {step.loc['16', 'speed-up over explicit']:.2f}× faster than the explicit path",
              f"the 1-head step is {step.loc['1', 'speed-up over explicit']:.2f}× faster"]
    over = {h: (layer.loc[h, "pytorch ops ms"] / layer.loc[h, "fast ms"],
                layer.loc[h, "explicit ms"] / layer.loc[h, "fast ms"]) for h in ("1", "16")}
    quoted += [f"{over['1'][0]:.1f} times as fast as PyTorch's ops and {over['1'][1]:.1f} times as fast as the explicit",
               f"at 16 heads, {over['16'][0]:.1f} and {over['16'][1]:.1f} times"]
    hours = schedules["8 cells, hours"].iloc[:2].astype(float)
    alone, two_threads = schedules["16 heads ms/step"].iloc[2], schedules["16 heads ms/step"].iloc[0]
    quoted += [f"{hours.iloc[0]:.2f} against {hours.iloc[1]:.2f} hours in this run",
               f"at 16 heads {alone} against {two_threads} ms"]
    quoted.append(cpu.split("Monte Carlo on the same layer: ")[1].split(" in a batched")[0])  # 112x ..., 553x per layer
    for phrase in quoted:
        assert " ".join(phrase.split()) in " ".join(speed.split()), phrase


def test_pretrained_speed_doc_is_the_bench_report():
    """docs/pretrained.md's speed tables are results/bench_pretrained_cpu.md's, and the passes, loads and peaks its
    text quotes for the packaged models are that report's."""
    doc = (ROOT / "docs" / "pretrained.md").read_text().split("## Speed and memory")[1]
    report = (ROOT / "results" / "bench_pretrained_cpu.md").read_text()
    assert len(markdown_tables(doc)) == 4 and all(table in markdown_tables(report) for table in markdown_tables(doc))
    real = markdown_frame(markdown_tables(report)[0]).set_index("model")
    for model, name in (("smollm2", "SmolLM2"), ("gemma3-270m", "Gemma 3")):
        row = real.loc[model]
        quoted = (f"{name}: **{float(row['studies in forward passes']):.2f} passes**",
                  f"{name} in {float(row['load from the cached copy (s)']):.1f} s from its cached copy",
                  f"{float(row['peak GiB']):.2f} GiB")
        for phrase in quoted:
            assert phrase in " ".join(doc.split()), phrase


ABSOLUTE_PATH = re.compile(r"(?<![\w.~])(/(?:root|home|usr|tmp|opt|var|work|Users|private|mnt|srv)/|[A-Za-z]:\\\\|"
                           r"site-packages)")


def test_no_committed_result_names_a_folder_of_the_machine_that_made_it():
    """Every text file under results/ (run records, reports, tables) is portable: no absolute path of the machine
    that wrote it (a site-packages folder, a home, /tmp, /usr/share, a Windows drive)."""
    texts = [path for path in (ROOT / "results").rglob("*") if path.suffix in (".json", ".md", ".csv", ".txt")]
    assert len(texts) > 100
    found = {str(path.relative_to(ROOT)): match.group(0) for path in texts
             for match in [ABSOLUTE_PATH.search(path.read_text(errors="replace"))] if match}
    assert not found, found
    assert ABSOLUTE_PATH.search('"file": "/usr/share/common-licenses/GPL-3"') and ABSOLUTE_PATH.search(
        "C:\\\\Users\\\\me") and not ABSOLUTE_PATH.search("--ckpt-dir ../shared/x .../checkpoints")
