"""The batched evaluations of main.py and test_amplification.py equal one-sequence-at-a-time evaluation."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import ROOT  # noqa: F401

import proxies
from main import evaluate, evaluation_sequences
from test_amplification import amplification, fresh_sequences
from train import QUICK, build_model


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
