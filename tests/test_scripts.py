"""Every script end to end in its quick mode, into a temporary folder; and main.py on the authors' models."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import OFFICIAL, ROOT, needs_official

import example2


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


def test_example2_script(tmp_path):
    out = run("example2.py", "--quick", "--out", tmp_path)
    assert "multi: phi_min = 0.4167" in out
    for name in ("head1", "head2", "multi"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000 and (tmp_path / f"{name}.pdf").is_file()
    table = pd.read_csv(tmp_path / "signal_at_sink.csv")
    assert len(table) == 20 and table["multi_w_%"][0] == pytest.approx(100 * 5 / 12, abs=1e-3)


def test_train_script_quick(tmp_path):
    out = run("train.py", "--heads", 4, "--task", "cycle", "--quick", "--ckpt-dir", tmp_path, "--epochs", 2)
    assert "Epoch 2/2, Loss:" in out and (tmp_path / "4_heads_cycle.pt").is_file()


def test_main_and_amplification_quick_are_deterministic(tmp_path):
    """--jobs 1 and --jobs 2 train bit-identical checkpoints and give the same section4.csv, byte for byte."""
    ckpt = tmp_path / "ckpt"
    out = run("main.py", "--quick", "--ckpt-dir", ckpt, "--out", tmp_path / "a", "--jobs", 2)
    assert "Layer 2 — mixing time:" in out
    run("main.py", "--quick", "--ckpt-dir", tmp_path / "ckpt1", "--out", tmp_path / "b", "--jobs", 1)
    a, b = (tmp_path / "a" / "section4.csv").read_text(), (tmp_path / "b" / "section4.csv").read_text()
    assert a == b
    for path in ckpt.glob("*.pt"):
        one, two = (torch.load(p, weights_only=True)["state_dict"] for p in (path, tmp_path / "ckpt1" / path.name))
        assert all(torch.equal(one[k], two[k]) for k in one)
    table = pd.read_csv(tmp_path / "a" / "section4.csv")
    assert len(table) == 2 * 4 * 2 and table.fidelity_mean.between(0, 100).all()
    assert (table.mixing_time_mean >= 12 / 12).all()  # the start-0 trap alone scores max_steps / T
    for ext in ("md", "png", "pdf"):
        assert (tmp_path / "a" / f"section4.{ext}").is_file()
    out = run("test_amplification.py", "--quick", "--ckpt-dir", ckpt, "--out", tmp_path / "a", "--samples", 4)
    assert "Best individual fidelity" in out
    for name in ("table5_copy", "table6_cycle"):
        t = pd.read_csv(tmp_path / "a" / f"{name}.csv")
        assert len(t) == 3 * 2 and (t.wins <= 4).all() and (tmp_path / "a" / f"{name}.md").is_file()
        assert (t.amplification == (t["combined_%"] > t["best_individual_%"])).all()
    out = run("synergy.py", "--quick", "--ckpt-dir", ckpt, "--out", tmp_path / "a")
    assert "Spearman rho(diversity, synergy)" in out and "loaded" in out and "training" not in out
    t = pd.read_csv(tmp_path / "a" / "synergy.csv")
    assert {"task", "heads", "layer", "proxy", "combined", "parallel", "best_head", "synergy", "ci_low", "ci_high",
            "p_value", "diversity"} <= set(t.columns) and len(t) == 2 * 3 * 2 * 2
    assert (t.ci_low <= t.synergy + 1e-12).all() and (t.synergy <= t.ci_high + 1e-12).all()
    assert t.p_value.between(0, 1).all() and t.diversity.between(0, 1).all()
    sign = np.where(t.proxy == "fidelity", 1, -1)
    assert np.allclose(t.synergy, sign * (t.combined - t.parallel))  # the mean of paired differences
    for ext in ("md", "png", "pdf"):
        assert (tmp_path / "a" / f"synergy.{ext}").is_file()
    mc = run("main.py", "--quick", "--ckpt-dir", ckpt, "--out", tmp_path / "mc", "--estimator", "mc",
             "--heads", 4, "--tasks", "copy")
    assert "(mc mixing time)" in mc


@needs_official
def test_main_on_the_authors_checkpoints(tmp_path):
    run("main.py", "--ckpt-dir", OFFICIAL, "--out", tmp_path, "--heads", 1, 16)
    t = pd.read_csv(tmp_path / "section4.csv").set_index(["task", "heads", "layer"])
    # The paper's qualitative findings: one head mixes far slower and keeps almost no fidelity in deep layers.
    for task in ("copy", "cycle"):
        for layer in (2, 3):
            assert t.loc[(task, 1, layer), "mixing_time_mean"] > 5 * t.loc[(task, 16, layer), "mixing_time_mean"]
            assert t.loc[(task, 1, layer), "fidelity_mean"] < t.loc[(task, 16, layer), "fidelity_mean"]


@pytest.mark.parametrize("args, message", [
    (("main.py", "--heads", 3), "a head count must divide embed_dim=64, got 3"),
    (("test_amplification.py", "--samples", 0), "--samples must be at least 1, got 0"),
    (("train.py", "--heads", 4, "--task", "copy", "--epochs", 0), "--epochs must be at least 1, got 0"),
    (("train.py", "--threads", 0), "--threads must be at least 1, got 0"),
    (("main.py", "--time-budget", 0), "--time-budget must be a positive number of minutes, got 0.0"),
    (("synergy.py", "--official", "--ckpt-dir", "x"), "cannot be combined with --ckpt-dir"),
])
def test_bad_flags_are_usage_errors(args, message):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr


def test_gpu_run_script_rehearsed_on_the_cpu(tmp_path):
    """paper_scale_gpu.sh end to end with --quick on the CPU: smoke run, 8 cells, seeds, bench, archives."""
    import tarfile
    out = tmp_path / "out"
    out.mkdir()
    env = dict(__import__("os").environ, OUT=str(out), DEVICE="cpu", QUICK="--quick")
    # A 3-minute budget: each phase ends when its work is done; the 8 cells get about a minute, room for a busy CPU.
    result = subprocess.run(["bash", "paper_scale_gpu.sh", "3"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "smoke passed" in log and "8 of 8 cells done" in log and "bench exit 0" in log
    archive = tmp_path / "paper_scale.tgz"
    archive.write_bytes(b"".join(p.read_bytes() for p in sorted(out.glob("paper_scale.tgz.part-*"))))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert sum(n.startswith("checkpoints/") and n.endswith(".pt") for n in names) == 8
    assert "results/bench_cpu.md" in names and "log.txt" in names
    assert sorted(out.glob("seeds.tgz.part-*"))  # the seed study ran (quick cells are fast)
