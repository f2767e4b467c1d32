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
