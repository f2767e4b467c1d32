"""The batched evaluations of evaluation.py equal one-sequence-at-a-time evaluation and their definitions."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import pandas as pd
from conftest import CROSS_MACHINE_ATOL, OFFICIAL, ROOT, needs_official, same_on_any_cpu

import proxies
from checkpoints import build_model, load_model
from evaluation import (amplification, evaluation_sequences, fresh_sequences, head_diversity,
                        layer_values, paired, section4_summary, section4_values, synergy_rows, tables56_rows,
                        win_statistics)
from config import HEADS, PAPER, QUICK, TASKS
from sequence_datasets import make_dataset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(QUICK, 4).eval()


def test_section4_batch_equals_per_sequence(model):
    tokens = evaluation_sequences(QUICK, "cycle", seed=1)
    assert tokens.shape == (QUICK.eval_sequences, QUICK.seq_length)
    batch = section4_values(model, tokens, QUICK)
    for s in range(len(tokens)):
        one = section4_values(model, tokens[s:s + 1], QUICK)
        for name in batch:
            assert np.allclose(batch[name][s], one[name][0], rtol=1e-6), name
    # and directly from the definition, layer by layer, with the learned weights
    attn = model.attention(tokens[:1])[0]
    for layer in range(QUICK.num_layers):
        w = proxies.head_weights(model.layers[layer].attn)
        assert batch["fidelity"][0, layer] == pytest.approx(proxies.minimax_fidelity(attn[layer], w), rel=1e-6)


def test_evaluation_sequences_are_first_of_shuffled_batches():
    """The protocol pinned: the first sequence of each batch of one seeded shuffle of the training set."""
    tokens = evaluation_sequences(QUICK, "copy", seed=2)
    data = make_dataset("copy", QUICK.num_sequences, QUICK.seq_length, QUICK.vocab_size, 2)
    chosen = [int((data.inputs == t).all(1).nonzero()[0]) for t in tokens]  # which training sequences they are
    shuffle = torch.randperm(QUICK.num_sequences, generator=torch.Generator().manual_seed(2))
    batches = [shuffle[i:i + QUICK.batch_size] for i in range(0, QUICK.num_sequences, QUICK.batch_size)]
    assert chosen == [int(b[0]) for b in batches][:QUICK.eval_sequences] == [48, 20, 108, 90, 57, 21]
    with pytest.raises(ValueError, match="evaluation sequences need"):
        evaluation_sequences(dataclasses.replace(QUICK, eval_sequences=100), "copy", seed=2)


def test_amplification_batch_equals_per_sequence_and_per_head(model):
    model = copy.deepcopy(model)
    d = QUICK.embed_dim // 4
    with torch.no_grad():  # far from uniform head weights, so that the learned weights decide "combined"
        for layer in model.layers:
            layer.attn.out_proj.weight[:, :d] *= 6
    tokens = fresh_sequences(QUICK, 3, seed=5)
    best, combined = amplification(model, tokens, QUICK.horizon)
    attn = model.attention(tokens)
    for s in range(3):
        b, c = amplification(model, tokens[s:s + 1], QUICK.horizon)
        assert np.allclose(best[s], b[0]) and np.allclose(combined[s], c[0])
        for layer in range(QUICK.num_layers):
            heads = [proxies.minimax_fidelity(attn[s, layer, h]) for h in range(4)]
            assert best[s, layer] == pytest.approx(max(heads))
            # the combination with the learned weights, worked out here: each head's block norm of out_proj
            weight = model.layers[layer].attn.out_proj.weight.detach().double()
            norms = np.array([weight[:, h * d:(h + 1) * d].norm().item() for h in range(4)])
            by_hand = proxies.minimax_fidelity(attn[s, layer], norms / norms.sum())
            assert combined[s, layer] == pytest.approx(by_hand, rel=1e-9)
            assert by_hand != pytest.approx(proxies.minimax_fidelity(attn[s, layer]), rel=1e-6)  # not uniform


def test_committed_section4_reproduces_from_committed_checkpoints():
    """results/section4.csv is what our checkpoints give, on this machine, within the cross-machine tolerance."""
    committed = pd.read_csv(ROOT / "results" / "section4.csv")
    rows = []
    for task in TASKS:
        tokens = evaluation_sequences(PAPER, task, 42)
        for heads in HEADS:
            model, facts = load_model(PAPER, heads, ROOT / "checkpoints" / f"{heads}_heads_{task}.pt", "cpu")
            assert facts["epochs"] == PAPER.epochs
            rows += section4_summary(section4_values(model, tokens, PAPER), task, heads, "exact")
    fresh = pd.DataFrame(rows)
    assert list(fresh.columns) == list(committed.columns) and len(fresh) == len(committed) == 32
    assert (fresh[["task", "heads", "layer"]].values == committed[["task", "heads", "layer"]].values).all()
    values = [c for c in committed.columns if c.endswith(("_mean", "_std"))]
    assert same_on_any_cpu(fresh[values], committed[values], atol=CROSS_MACHINE_ATOL)


def test_win_statistics_by_hand():
    best = np.zeros(11)
    combined = np.array([1.0] * 8 + [-1.0] * 2 + [0.0])  # 8 wins, 2 losses, 1 tie
    s = win_statistics(combined, best)
    assert (s["wins"], s["ties"], s["samples"]) == (8, 1, 11) and s["win_rate"] == pytest.approx(8 / 11)
    assert s["p_value"] == pytest.approx(2 * (45 + 10 + 1) / 2 ** 10)  # sign test on the 10 untied: 2 P(X >= 8)
    z, n, p = 1.959963984540054, 11, 8 / 11  # Wilson's interval from its formula
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (s["win_ci_low"], s["win_ci_high"]) == pytest.approx((centre - half, centre + half))


def test_synergy_statistics_and_diversity_by_hand():
    mean, low, high, p_value = paired(np.array([1.0, 2.0, 3.0, 4.0]))
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(0.975, 3 df) x s / sqrt(4)
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert p_value == pytest.approx(2 / 16)  # exact signed-rank test: all four positive
    assert paired(np.zeros(5)) == (0.0, 0.0, 0.0, 1.0)
    one_hot = [[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]  # row 0 alike in every head; row 1 differs
    assert head_diversity(np.array(one_hot)) == pytest.approx(1.0)
    assert head_diversity(np.array([*one_hot, one_hot[0]])) == pytest.approx(2 / 3)  # pairs: 1, 0, 1


def test_head_diversity_of_long_causal_heads_equals_its_definition():
    """At T = 300 head_diversity compares each block of query rows over the keys they see: the same as the mean over
    queries 1..T-1 and pairs of heads of the total-variation distance of whole rows, summed here pair by pair; a
    non-causal batch (every key read) too."""
    rng = np.random.default_rng(4)
    for attn in (np.tril(rng.random((2, 4, 300, 300))), rng.random((1, 3, 300, 300))):
        attn /= attn.sum(-1, keepdims=True)
        H = attn.shape[1]
        pairs = [(h, g) for h in range(H) for g in range(h + 1, H)]
        tv = [np.mean([0.5 * np.abs(a[h, 1:] - a[g, 1:]).sum(-1) for h, g in pairs], axis=0).mean() for a in attn]
        assert np.allclose(head_diversity(attn), tv, rtol=1e-13, atol=0)


def test_synergy_layer_values_from_their_definitions():
    """layer_values on two known heads with weights 3:1: best head = max fidelity and min mixing time over the heads,
    parallel mixing time = the weighted mean of the heads' own, parallel fidelity from matrix powers of each head,
    combined = the proxies of 0.75 A + 0.25 B."""
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 1, 2, 5, 5, generator=generator, dtype=torch.float64) * 4
    attn = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    out_proj = SimpleNamespace(weight=torch.tensor([[3.0, 1.0], [0.0, 0.0]]))  # head blocks of norm 3 and 1
    model = SimpleNamespace(attention=lambda tokens: attn,
                            layers=[SimpleNamespace(attn=SimpleNamespace(num_heads=2, out_proj=out_proj))])
    cfg = dataclasses.replace(QUICK, horizon=7, max_steps=30)
    values, diversity = layer_values(model, None, cfg)
    for s in range(3):
        a, b = attn[s, 0, 0].numpy(), attn[s, 0, 1].numpy()
        mixing = [proxies.mixing_time(a, max_steps=30), proxies.mixing_time(b, max_steps=30)]
        fidelity = [proxies.minimax_fidelity(a, horizon=7), proxies.minimax_fidelity(b, horizon=7)]
        assert values["mixing_time"]["best_head"][s, 0] == pytest.approx(min(mixing))
        assert values["fidelity"]["best_head"][s, 0] == pytest.approx(max(fidelity))
        assert values["mixing_time"]["parallel"][s, 0] == pytest.approx(0.75 * mixing[0] + 0.25 * mixing[1])
        assert values["mixing_time"]["combined"][s, 0] == pytest.approx(
            proxies.mixing_time(0.75 * a + 0.25 * b, max_steps=30))
        assert values["fidelity"]["combined"][s, 0] == pytest.approx(proxies.minimax_fidelity(0.75 * a + 0.25 * b,
                                                                                             horizon=7))
        # parallel fidelity: each head diffuses on its own, the sink's shares mixed 3:1 at every step t = 1..7
        at_sink = np.array([0.75 * np.linalg.matrix_power(a, t)[-1] + 0.25 * np.linalg.matrix_power(b, t)[-1]
                            for t in range(1, 8)])
        assert values["fidelity"]["parallel"][s, 0] == pytest.approx(100 * at_sink.max(0).min())
        rows = 0.5 * np.abs(a[1:] - b[1:]).sum(-1)  # total variation of each query row past row 0
        assert diversity[s, 0] == pytest.approx(rows.mean())


def committed_checkpoints():
    """Ours, and the authors' (reported as skipped where their checkpoints are absent)."""
    return [("checkpoints", ROOT / "checkpoints", ROOT / "results"),
            pytest.param("official", OFFICIAL, ROOT / "results" / "official", marks=needs_official)]


@pytest.mark.parametrize("name, folder, results", committed_checkpoints(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_committed_tables56_and_synergy_reproduce(name, folder, results):
    """results/table5_copy.csv, table6_cycle.csv and synergy.csv (ours, and the authors' in results/official/) are
    what the checkpoints give, within the cross-machine tolerance: two cells of each, to keep the suite short."""
    cells = [(4, "copy"), (16, "cycle")]
    models = {(h, t): load_model(PAPER, h, folder / f"{h}_heads_{t}.pt", "cpu")[0] for h, t in cells}

    def committed(path, keys):
        table = pd.read_csv(path)
        table = table[[(h, t) in cells for h, t in zip(table.heads, table.task)]]
        return table.sort_values(keys).reset_index(drop=True)

    keys = ["task", "heads", "layer"]
    fresh = pd.DataFrame(tables56_rows(models, PAPER, 50, 42)).sort_values(keys).reset_index(drop=True)
    tables = pd.concat([committed(results / f"{t}.csv", ["heads", "layer"]) for t in ("table5_copy", "table6_cycle")])
    tables = tables.sort_values(keys).reset_index(drop=True)
    assert (fresh[keys].values == tables[keys].values).all() and len(fresh) == 8
    percent = [c for c in tables.columns if c.endswith("_%")]
    assert same_on_any_cpu(fresh[percent], tables[percent], atol=CROSS_MACHINE_ATOL)
    assert (np.abs(fresh.wins - tables.wins) <= 1).all()  # a near-tie may fall either way on another CPU
    same_counts = (fresh.wins == tables.wins) & (fresh.ties == tables.ties)  # then the statistics are the same
    statistics = ["win_rate", "win_ci_low", "win_ci_high", "p_value"]
    assert same_counts.sum() >= 6 and np.allclose(fresh[statistics][same_counts], tables[statistics][same_counts],
                                                  rtol=1e-12, atol=0)
    keys = ["task", "heads", "layer", "proxy"]
    fresh = pd.DataFrame(synergy_rows(models, PAPER, 42)).sort_values(keys).reset_index(drop=True)
    synergy = committed(results / "synergy.csv", keys)
    assert (fresh[keys].values == synergy[keys].values).all() and len(fresh) == 16
    columns = ["combined", "parallel", "best_head", "synergy", "ci_low", "ci_high", "gain_over_best", "diversity"]
    assert same_on_any_cpu(fresh[columns], synergy[columns], atol=CROSS_MACHINE_ATOL)
    # Wilcoxon p-values rank the paired differences: a near-tie swapped on another CPU moves p a little, not 5%
    p_values = ["p_value", "gain_over_best_p"]
    assert np.allclose(fresh[p_values], synergy[p_values], rtol=0.05, atol=1e-6)
