import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official_checkpoints"
sys.path.insert(0, str(ROOT))

# The same computation on another CPU. A model's float32 forward pass rounds differently on each instruction set
# (PyTorch's kernels and MKL's), and the float64 proxies carry that into every value. Measured on a 2-core AMD EPYC
# (family 25, AVX-512) against the committed values, which an AVX-512 machine made: with ATEN_CPU_CAPABILITY=default,
# =avx2, and avx2 with MKL_ENABLE_INSTRUCTIONS=AVX2, at 1 and 2 threads, SmolLM2's layer 3 (every column of a prose
# sample, both DAGs) moved by at most 1.2e-6 relative, and seed 42's 4-head cycle rows of amplification_trained.csv
# by 1.9e-5 (fidelity_synergy, a difference of two fidelities); at the machine's own capability, by 4.5e-15, with 1
# thread or 2. A margin of 5 on the largest. Values computed in float64 from the start stay exactly equal.
CROSS_CPU_RTOL = 1e-4
CROSS_CPU_ATOL = 1e-12  # a value that is 0 on one CPU and 1e-17 on another
# Section 4's tables (and those that average the same proxies) hold means and stds over 50 sequences: their values
# near 0 (a std, a collapsed layer's fidelity of 1e-8 %) agree absolutely, in steps or percentage points. A 1e-6
# relative perturbation of every weight moves no value by more than 2e-5.
CROSS_MACHINE_ATOL = 1e-3


def same_on_any_cpu(fresh, committed, atol=CROSS_CPU_ATOL):
    """Whether values recomputed here equal committed ones within CROSS_CPU_RTOL (arrays, elementwise)."""
    return np.allclose(np.asarray(fresh, dtype=float), np.asarray(committed, dtype=float), rtol=CROSS_CPU_RTOL,
                       atol=atol, equal_nan=True)


needs_official = pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"authors' checkpoints not found at {OFFICIAL}")


@pytest.fixture
def run_main(monkeypatch, capsys):
    """A script's main() in this process, as `python SCRIPT.py ARGS` from the repo's folder would run it (without
    the interpreter's start-up, ~3 s a call here): returns (exit status, stdout, stderr)."""
    def run(script, *args):
        module = __import__(script.removesuffix(".py"))
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        monkeypatch.chdir(ROOT)
        try:
            module.main()
            code = 0
        except SystemExit as exit_status:
            code = exit_status.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.fixture
def run_ok(run_main):
    """run_main that expects exit status 0 and returns stdout."""
    def run(script, *args):
        code, out, err = run_main(script, *args)
        assert code == 0, err[-3000:]
        return out
    return run


def markdown_tables(text):
    """The Markdown tables of a text, each as its block of `|` lines."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            tables.append("\n".join(rows))
            rows = []
    return tables


def markdown_frame(table):
    """A Markdown table as a DataFrame of its cells' stripped text (the header row its columns)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    return pd.DataFrame(rows[2:], columns=rows[0])


def reference_attention(q, k, v, causal, keep=None, p=0.0):
    """softmax(q k^T / sqrt(d) + mask), dropout by `keep` rescaled by 1 / (1 - p), @ v, in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[-2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.softmax(-1)
    if keep is not None:
        weights = weights * keep / (1 - p)
    return weights @ v


def authors_walk_reference(C):
    """The authors' walk as docs/proxies.md defines it, built entry by entry from C (T, T), rows = queries:
    P[c, k] = min(S_k, 1) - min(S_(k-1), 1) with S_k = C[0, c] + ... + C[k, c], the rest of column c to the sink,
    which absorbs."""
    T = len(C)
    P = np.zeros((T, T))
    for c in range(T - 1):
        cumulative = 0.0
        for k in range(T - 1):
            new = min(cumulative + C[k, c], 1.0)
            P[c, k], cumulative = new - cumulative, new
        P[c, T - 1] = 1.0 - cumulative
    P[T - 1, T - 1] = 1.0
    return P
