"""Every script end to end in its quick mode, into a temporary folder; and main.py on the authors' models."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import OFFICIAL, ROOT, markdown_frame, markdown_tables, needs_official

import example2
import lm_costs
from config import HEADS, QUICK, TASKS
from checkpoints import checkpoint_path, load_model
from evaluation import STUDIES, section4_rows, synergy_rows, tables56_rows


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_figure3_values():
    result = example2.analyse()
    assert result["head1"]["phi_min"] == pytest.approx(0.375, abs=1e-4) and result["head1"]["set_by"] == "v"
    assert result["head2"]["phi_min"] == pytest.approx(0.25, abs=1e-4) and result["head2"]["set_by"] == "u"
    assert result["multi"]["phi_min"] == pytest.approx(5 / 12, abs=1e-4) and result["multi"]["set_by"] == "w"
    # By hand: the sink's row at t = 1 is head1 [0, 0, 1/2, 1/2], head2 [0, 1/3, 1/3, 1/3], their mean for multi;
    # head 1 at t = 3 carries 3/8 of v's signal.
    assert np.allclose(result["head1"]["signal"][0], [0, 0, 1 / 2, 1 / 2])
    assert np.allclose(result["head2"]["signal"][0], [0, 1 / 3, 1 / 3, 1 / 3])
    assert np.allclose(result["multi"]["signal"][0], [0, 1 / 6, 5 / 12, 5 / 12])
    assert result["head1"]["signal"][2, 1] == pytest.approx(3 / 8)


def test_example2_script(tmp_path, run_ok):
    out = run_ok("example2.py", "--quick", "--out", tmp_path)
    assert "multi: phi_min = 0.4167" in out
    for name in ("head1", "head2", "multi"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and (tmp_path / f"{name}.pdf").is_file()
    table = pd.read_csv(tmp_path / "signal_at_sink.csv")
    assert len(table) == 20 and table["multi_w_%"][0] == pytest.approx(100 * 5 / 12, abs=1e-3)


def test_train_script_quick(tmp_path):
    out = run("train.py", "--heads", 4, "--tasks", "cycle", "--quick", "--ckpt-dir", tmp_path, "--epochs", 2)
    assert "Epoch 2/2, Loss:" in out and (tmp_path / "4_heads_cycle.pt").is_file()


def test_main_and_amplification_quick_are_deterministic(tmp_path, run_ok):
    """--jobs 2 and --jobs 1 (both --threads 1) train bit-identical checkpoints and the same section4.csv rows (the
    second run on 4 of the 8 cells, to keep the suite short)."""
    ckpt = tmp_path / "ckpt"
    out = run("main.py", "--quick", "--ckpt-dir", ckpt, "--out", tmp_path / "a", "--jobs", 2, "--threads", 1)
    assert "Layer 2 — mixing time:" in out
    run("main.py", "--quick", "--ckpt-dir", tmp_path / "ckpt1", "--out", tmp_path / "b", "--jobs", 1, "--threads", 1,
        "--heads", 1, 4)
    a, b = (pd.read_csv(tmp_path / name / "section4.csv") for name in ("a", "b"))
    pd.testing.assert_frame_equal(a[a.heads.isin([1, 4])].reset_index(drop=True), b)
    assert len(list((tmp_path / "ckpt1").glob("*.pt"))) == 4
    for path in (tmp_path / "ckpt1").glob("*.pt"):
        one, two = (torch.load(p, weights_only=True)["state_dict"] for p in (path, ckpt / path.name))
        assert all(torch.equal(one[k], two[k]) for k in one)
    # every file holds what the library gives for these checkpoints and seed 42, p-values and intervals included
    models = {(h, t): load_model(QUICK, h, checkpoint_path(ckpt, h, t), "cpu")[0] for h in HEADS for t in TASKS}
    multi = {cell: model for cell, model in models.items() if cell[0] > 1}
    written = lambda name: pd.read_csv(tmp_path / "a" / f"{name}.csv")
    same = lambda table, rows: pd.testing.assert_frame_equal(table, pd.DataFrame(rows), check_dtype=False)
    same(written("section4"), section4_rows(models, QUICK, 42))
    for ext in ("md", "png", "pdf"):
        assert (tmp_path / "a" / f"section4.{ext}").is_file()
    out = run_ok("test_amplification.py", "--quick", "--ckpt-dir", ckpt, "--out", tmp_path / "a", "--samples", 4)
    assert "Best individual fidelity" in out
    tables = pd.DataFrame(tables56_rows(multi, QUICK, 4, 42))
    for name, task in (("table5_copy", "copy"), ("table6_cycle", "cycle")):
        same(written(name), tables[tables.task == task].reset_index(drop=True))
        assert (tmp_path / "a" / f"{name}.md").is_file()
    out = run_ok("synergy.py", "--quick", "--ckpt-dir", ckpt, "--out", tmp_path / "a")
    assert "Spearman rho(diversity, synergy)" in out and "loaded" in out and "training" not in out
    same(written("synergy"), synergy_rows(multi, QUICK, 42))
    for ext in ("md", "png", "pdf"):
        assert (tmp_path / "a" / f"synergy.{ext}").is_file()
    mc = run_ok("main.py", "--quick", "--ckpt-dir", ckpt, "--out", tmp_path / "mc", "--estimator", "mc",
             "--heads", 4, "--tasks", "copy")
    assert "(mc mixing time)" in mc
    # the Monte Carlo estimate the script writes is the seeded estimator's (whose bias test_proxies pins), not exact
    mc_rows = section4_rows({(4, "copy"): models[4, "copy"]}, QUICK, 42, estimator="mc")
    same(written("../mc/section4"), mc_rows)
    assert not np.array_equal(pd.DataFrame(mc_rows).mixing_time_mean, written("section4").query(
        "task == 'copy' and heads == 4").mixing_time_mean)


@needs_official
def test_main_on_the_authors_checkpoints(tmp_path, run_ok):
    run_ok("main.py", "--ckpt-dir", OFFICIAL, "--out", tmp_path, "--heads", 1, 16)
    t = pd.read_csv(tmp_path / "section4.csv").set_index(["task", "heads", "layer"])
    # The paper's qualitative findings: one head mixes far slower and keeps almost no fidelity in deep layers.
    for task in ("copy", "cycle"):
        for layer in (2, 3):
            assert t.loc[(task, 1, layer), "mixing_time_mean"] > 5 * t.loc[(task, 16, layer), "mixing_time_mean"]
            assert t.loc[(task, 1, layer), "fidelity_mean"] < t.loc[(task, 16, layer), "fidelity_mean"]


@pytest.mark.parametrize("args, message", [
    (("main.py", "--heads", 3), "a head count must divide embed_dim=64, got 3"),
    (("test_amplification.py", "--samples", 0), "--samples must be at least 1, got 0"),
    (("train.py", "--heads", 4, "--tasks", "copy", "--epochs", 0), "--epochs must be at least 1, got 0"),
    (("train.py", "--threads", 0), "--threads must be at least 1, got 0"),
    (("main.py", "--time-budget", 0), "--time-budget must be a positive number of minutes, got 0.0"),
    (("synergy.py", "--official", "--ckpt-dir", "x"), "cannot be combined with --ckpt-dir"),
])
def test_bad_flags_are_usage_errors(args, message, run_main):
    code, _, err = run_main(*args)
    assert code == 2 and message in err


def _rehearse_gpu_run(tmp_path, **env):
    """paper_scale_gpu.sh with --quick on the CPU under a 3-minute budget (each phase ends when its work is done);
    returns its log and the names in its two archives."""
    import os
    import tarfile
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), DEVICE="cpu", QUICK="--quick", PYTHON=sys.executable, **env)
    result = subprocess.run(["bash", "paper_scale_gpu.sh", "3"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SMOKE FAILED" not in (out / "log.txt").read_text(), (out / "log.txt").read_text()[-3000:]

    def names(prefix):
        archive = tmp_path / f"{prefix}.tgz"
        archive.write_bytes(b"".join(p.read_bytes() for p in sorted(out.glob(f"{prefix}.tgz.part-*"))))
        with tarfile.open(archive) as tar:
            return tar.getnames()
    return (out / "log.txt").read_text(), names("seeds"), names("run")


def _seed_cells(*seeds):
    """The archive names of the seeds' cells (the default grid: every head count and task)."""
    return sorted(str(checkpoint_path(f"seeds/seed_{s}", h, t)) for s in seeds for h in HEADS for t in TASKS)


def test_gpu_run_script_rehearsed_on_the_cpu(tmp_path):
    """paper_scale_gpu.sh end to end with GROUP=yes: smoke runs, two seeds' 16 cells grouped, bench, archives."""
    log, seeds, run = _rehearse_gpu_run(tmp_path, GROUP="yes", BENCH_SECONDS="240", SEEDS="0 2")
    assert "smoke passed" in log and "grouped smoke passed" in log and "bench exit 0" in log
    training = log.split("training seeds", 1)[1]  # after the grouped smoke run, which trains groups of 4 too
    assert "16 of 16 cells done, 16 new" in log and training.count("training a group of 4 cells of") == 4  # 2 x 2
    assert sorted(n for n in seeds if n.endswith(".pt")) == _seed_cells(0, 2)
    assert {"results/bench_cpu.md", "log.txt"} <= set(run)


def test_gpu_run_script_trains_only_the_seeds_asked_for(tmp_path):
    """SEEDS, JOBS and BENCH_SECONDS=0, GROUP left out: one seed, one cell per process (2 at once: 8 processes on 2
    cores would spend the test's time starting), no grouped smoke run, no bench."""
    log, seeds, run = _rehearse_gpu_run(tmp_path, SEEDS="3", JOBS="2", BENCH_SECONDS="0")
    assert "smoke passed" in log and "one cell per process" in log and "grouped smoke" not in log
    assert "training seeds 3, 0 of 8 cells done" in log and "8 of 8 cells done, 8 new" in log
    assert "bench" not in log and "training a group" not in log
    assert sorted(n for n in seeds if n.endswith(".pt")) == _seed_cells(3)
    assert "log.txt" in run


@pytest.fixture(scope="module")
def truncated_checkpoint(tmp_path_factory):
    """A folder with a truncated 4_heads_copy.pt and no 4_heads_cycle.pt."""
    folder = tmp_path_factory.mktemp("bad")
    model = __import__("checkpoints").build_model(__import__("config").QUICK, 4)
    __import__("checkpoints").save_checkpoint(folder / "whole.pt", {"state_dict": model.state_dict()})
    (folder / "4_heads_copy.pt").write_bytes((folder / "whole.pt").read_bytes()[:1000])
    return folder


@pytest.mark.parametrize("args, message", [
    (("main.py", "--quick", "--heads", 4, "--ckpt-dir", "{bad}"), "4_heads_copy.pt could not be read as a PyTorch"),
    (("test_amplification.py", "--quick", "--heads", 4, "--ckpt-dir", "{bad}"), "4_heads_copy.pt could not be read"),
    (("main.py", "--quick", "--heads", 4, "--seeds", 0, "--ckpt-dir", "{bad}"), "4_heads_copy.pt could not be read"),
    (("example2.py", "--out", "/proc/none"), "--out /proc/none: expected a folder this user can create and write"),
    (("main.py", "--quick", "--out", "/proc/none"), "--out /proc/none: expected a folder"),
    (("synergy.py", "--heads", 1, 4), "every head count must be at least 2, got 1"),
    (("test_amplification.py", "--heads", 1), "every head count must be at least 2, got 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, truncated_checkpoint, tmp_path, run_main):
    """Refused at once (the missing 4_heads_cycle is not trained first), one line on stderr, nothing written. In this
    process: an uncaught exception (a traceback) fails the test."""
    args = [str(a).format(bad=truncated_checkpoint) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    code, stdout, stderr = run_main(*args, *out)
    error_lines = [line for line in stderr.splitlines() if not line.startswith(("usage:", " "))]
    assert code == 2 and "Traceback" not in stderr and "training" not in stdout
    assert error_lines == [line for line in error_lines if line.startswith(f"{args[0]}: error: ")] and \
        len(error_lines) == 1 and message in error_lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_bench_pretrained_quick_runs_every_measurement(tmp_path, run_ok):
    """bench.py --pretrained --quick: lm_costs' tables on tiny models, every study against every length, written."""
    out = run_ok("bench.py", "--pretrained", "--quick", "--device", "cpu", "--out", tmp_path)
    report = (tmp_path / "bench_pretrained_cpu.md").read_text()
    assert report in out and "left out with --quick" in report and "smollm2" not in report
    models, costs = (markdown_frame(table) for table in markdown_tables(report))
    assert models["what"][0] == "tiny shape, T = 64: one forward pass with output_attentions"
    assert models["what"][1].startswith("the same, every study, layers streamed (")
    assert models["what"][2] == "2 layers x 4 heads (width 64), T = 128: section4, layers streamed"
    assert (models["peak GiB"].astype(float) > 0).all()
    assert costs["study"].tolist() == list(STUDIES) and list(costs.columns[1:]) == ["T=16", "T=32", "T=64",
                                                                                   "log-log slope"]
    assert (costs[["T=16", "T=32", "T=64"]].astype(float) >= 0).all().all()
    assert np.isfinite(costs["log-log slope"].astype(float)).all()


def test_lm_costs_tables_from_made_up_timings(monkeypatch):
    """lm_costs' arithmetic on timings made up here: the cost table's slope is fitted on its three longest lengths
    (seconds 1, 1, 2, 8, 32 over T = 16..256: log2(32 / 2) / log2(256 / 64) = 2, where all five would give less);
    the real models' ratio is (command - its time at 16 tokens) / forward pass: (30 - 10) / 4 = 5."""
    made_up = {16: 1.0, 32: 1.0, 64: 2.0, 128: 8.0, 256: 32.0}
    monkeypatch.setattr(lm_costs, "measure", lambda plan, job, length, study, device: (made_up[length], 0.1))
    plan = lm_costs.CostPlan(cost_lengths=tuple(made_up), own_processes=False, real_models=False)
    table = lm_costs.cost_table(torch.device("cpu"), plan)
    assert (table["log-log slope"] == 2.0).all() and list(table.study) == list(STUDIES)
    assert table["T=256"].tolist() == [32.0] * len(STUDIES)

    def job(function, name, *args):
        assert isinstance(args[-1], torch.device)  # in_own_process measures the memory of the last argument's device
        if function is lm_costs.load_job:
            return (3.0 if args[0] else 20.0), 0.0
        length = args[0]
        return (4.0, 30.0 if length == lm_costs.REAL_LENGTH else 10.0, 2.5), 0.0
    monkeypatch.setattr(lm_costs, "in_own_process", job)
    rows = lm_costs.real_models_table(torch.device("cpu")).set_index("model")
    assert rows.loc["smollm2", "studies in forward passes"] == 5.0 and rows.loc["gemma3-270m", "peak GiB"] == 2.5
    assert rows.loc["smollm2", "load from the cached copy (s)"] == 3.0
    assert rows.loc["smollm2", "load from the GGUF file (s)"] == 20.0
