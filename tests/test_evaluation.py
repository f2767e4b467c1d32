"""The batched evaluations of main.py and test_amplification.py equal one-sequence-at-a-time evaluation."""
import dataclasses

import numpy as np
import pytest
import torch
import pandas as pd
from conftest import ROOT

import proxies
from main import CROSS_MACHINE_ATOL, evaluate, evaluation_sequences, summarise
from test_amplification import amplification, fresh_sequences
from train import HEADS, PAPER, QUICK, TASKS, build_model, load_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(QUICK, 4).eval()


def test_section4_batch_equals_per_sequence(model):
    tokens = evaluation_sequences(QUICK, "cycle", seed=1)
    assert tokens.shape == (QUICK.eval_sequences, QUICK.seq_length)
    batch = evaluate(model, tokens, QUICK)
    for s in range(len(tokens)):
        one = evaluate(model, tokens[s:s + 1], QUICK)
        for name in batch:
            assert np.allclose(batch[name][s], one[name][0], rtol=1e-6), name
    # and directly from the definition, layer by layer, with the learned weights
    attn = model.attention(tokens[:1])[0]
    for layer in range(QUICK.num_layers):
        w = proxies.head_weights(model.layers[layer].attn)
        assert batch["fidelity"][0, layer] == pytest.approx(proxies.minimax_fidelity(attn[layer], w), rel=1e-6)


def test_evaluation_sequences_are_first_of_shuffled_batches():
    tokens = evaluation_sequences(QUICK, "copy", seed=2)
    assert len({tuple(t.tolist()) for t in tokens}) == len(tokens)
    with pytest.raises(ValueError, match="evaluation sequences need"):
        evaluation_sequences(dataclasses.replace(QUICK, eval_sequences=100), "copy", seed=2)


def test_amplification_batch_equals_per_sequence_and_per_head(model):
    tokens = fresh_sequences(QUICK, 3, seed=5)
    best, combined = amplification(model, tokens, QUICK.horizon)
    attn = model.attention(tokens)
    for s in range(3):
        b, c = amplification(model, tokens[s:s + 1], QUICK.horizon)
        assert np.allclose(best[s], b[0]) and np.allclose(combined[s], c[0])
        for layer in range(QUICK.num_layers):
            heads = [proxies.minimax_fidelity(attn[s, layer, h]) for h in range(4)]
            assert best[s, layer] == pytest.approx(max(heads))


def test_committed_section4_reproduces_from_committed_checkpoints():
    """results/section4.csv is what our checkpoints give, on this machine, within the cross-machine tolerance."""
    committed = pd.read_csv(ROOT / "results" / "section4.csv")
    rows = []
    for task in TASKS:
        tokens = evaluation_sequences(PAPER, task, 42)
        for heads in HEADS:
            model, facts = load_model(PAPER, heads, ROOT / "checkpoints" / f"{heads}_heads_{task}.pt", "cpu")
            assert facts["epochs"] == PAPER.epochs
            rows += summarise(evaluate(model, tokens, PAPER), task, heads, "exact")
    fresh = pd.DataFrame(rows)
    assert list(fresh.columns) == list(committed.columns) and len(fresh) == len(committed) == 32
    assert (fresh[["task", "heads", "layer"]].values == committed[["task", "heads", "layer"]].values).all()
    values = [c for c in committed.columns if c.endswith(("_mean", "_std"))]
    assert np.allclose(fresh[values], committed[values], rtol=0, atol=CROSS_MACHINE_ATOL)


def test_win_statistics_by_hand():
    from test_amplification import win_statistics
    best = np.zeros(11)
    combined = np.array([1.0] * 8 + [-1.0] * 2 + [0.0])  # 8 wins, 2 losses, 1 tie
    s = win_statistics(combined, best)
    assert (s["wins"], s["ties"], s["samples"]) == (8, 1, 11) and s["win_rate"] == pytest.approx(8 / 11)
    assert s["p_value"] == pytest.approx(2 * (45 + 10 + 1) / 2 ** 10)  # sign test on the 10 untied: 2 P(X >= 8)
    z, n, p = 1.959963984540054, 11, 8 / 11  # Wilson's interval from its formula
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (s["win_ci_low"], s["win_ci_high"]) == pytest.approx((centre - half, centre + half))


def test_synergy_statistics_and_diversity_by_hand():
    from synergy import head_diversity, paired
    mean, low, high, p_value = paired(np.array([1.0, 2.0, 3.0, 4.0]))
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(0.975, 3 df) x s / sqrt(4)
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert p_value == pytest.approx(2 / 16)  # exact signed-rank test: all four positive
    assert paired(np.zeros(5)) == (0.0, 0.0, 0.0, 1.0)
    one_hot = [[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]  # row 0 alike in every head; row 1 differs
    assert head_diversity(np.array(one_hot)) == pytest.approx(1.0)
    assert head_diversity(np.array([*one_hot, one_hot[0]])) == pytest.approx(2 / 3)  # pairs: 1, 0, 1
