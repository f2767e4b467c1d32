"""pretrained.py --studies gradient: the model's own sensitivity against central finite differences of its Jacobian
on a tiny float64 Llama (no backward pass in the reference), the rollout by hand on three tokens, and the written
rho against scipy's Spearman on the written per-position values."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import lm_gradient  # noqa: E402

transformers = pytest.importorskip("transformers")
T = 6


@pytest.fixture(scope="module")
def tiny_gpt2():
    """GPT-2's layers compute in the model's dtype throughout (Llama's RMSNorm rounds to float32, which would swamp
    a finite difference): float64 here."""
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=24, max_position_embeddings=32,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def last_hidden(model, embedded):
    with torch.no_grad():
        return model.base_model(inputs_embeds=embedded, use_cache=False).last_hidden_state[0, -1]


def test_sensitivity_is_the_rms_of_the_jacobians_projections_by_finite_differences(tiny_gpt2):
    """On a float64 GPT-2: J_j = d h_{T-1} / d e_j column by column from central differences (step 1e-5), then s_j =
    sqrt(mean_k ||J_j^T u_k||^2) over the same unit directions: the backward passes' value within 1e-6."""
    ids = torch.randint(0, 40, (1, T), generator=torch.Generator().manual_seed(0))
    directions = lm_gradient.unit_directions(3, 16, seed=7)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    measured = lm_gradient.sensitivity(tiny_gpt2, ids, directions).numpy()
    embedded = tiny_gpt2.get_input_embeddings()(ids).detach()
    step, expected = 1e-5, []
    for j in range(T):
        jacobian = np.zeros((16, 16))  # (output, input feature of e_j)
        for feature in range(16):
            plus, minus = embedded.clone(), embedded.clone()
            plus[0, j, feature] += step
            minus[0, j, feature] -= step
            difference = last_hidden(tiny_gpt2, plus) - last_hidden(tiny_gpt2, minus)
            jacobian[:, feature] = (difference / (2 * step)).numpy()
        projections = directions.numpy() @ jacobian  # (K, 16): u_k^T J_j
        expected.append(np.sqrt((projections ** 2).sum(-1).mean()))
    assert np.allclose(measured, expected, rtol=1e-6)
    assert measured[-1] > 0 and (measured > 0).all()


def test_rollout_by_hand_on_three_tokens():
    """Two layers, T = 3. C_1 = [[1,0,0],[.5,.5,0],[.2,.3,.5]], C_2 = [[1,0,0],[.4,.6,0],[.1,.1,.8]]. M_l = (C_l + I)/2.
    Row 2 of M_2: (.05, .05, .9); times M_1: 0.05 (1, 0, 0) + 0.05 (.25, .75, 0) + 0.9 (.1, .15, .75)
    = (.1525, .1725, .675)."""
    C1 = np.array([[1, 0, 0], [.5, .5, 0], [.2, .3, .5]])
    C2 = np.array([[1, 0, 0], [.4, .6, 0], [.1, .1, .8]])
    assert np.allclose(lm_gradient.rollout_row([C1, C2]), [0.1525, 0.1725, 0.675], rtol=1e-12)
    assert lm_gradient.rollout_row([C1, C2]).sum() == pytest.approx(1.0)


def test_the_gradient_study_end_to_end(tiny_llama, tmp_path, run_ok):
    """--studies gradient on a saved tiny Llama: gradient.csv's rho for rollout and recency are scipy's Spearman of
    gradient_positions.csv's columns per sample (over j >= 1 and every j), averaged; every layer's reach is a row;
    the gain over recency is the paired mean difference."""
    folder = tmp_path / "llama"
    tiny_llama.save_pretrained(folder)
    run_ok("pretrained.py", "--model", folder, "--input", "random", "--length", 10, "--samples", 4, "--studies",
           "gradient", "--out", tmp_path / "out")
    out = tmp_path / "out" / "llama" / "random"
    table = pd.read_csv(out / "gradient.csv").set_index(["predictor", "positions"])
    positions = pd.read_csv(out / "gradient_positions.csv")
    assert set(table.index.get_level_values(0)) == {"rollout", "recency", "reach_1", "reach_2"}
    for name, part in (("after_first", slice(1, None)), ("all", slice(None))):
        rho = {"rollout": [], "recency": []}
        for _, sample in positions.groupby("sample"):
            s = sample.sensitivity.to_numpy()[part]
            rho["rollout"].append(stats.spearmanr(sample.rollout.to_numpy()[part], s).statistic)
            rho["recency"].append(stats.spearmanr(sample.position.to_numpy()[part], s).statistic)
        for predictor, values in rho.items():
            assert table.loc[(predictor, name), "rho_mean"] == pytest.approx(np.mean(values), rel=1e-9)
        gain = np.mean(np.array(rho["rollout"]) - np.array(rho["recency"]))
        assert table.loc[("rollout", name), "over_recency"] == pytest.approx(gain, rel=1e-9, abs=1e-12)
    assert (table.samples == 4).all() and len(positions) == 40
    assert {"gradient.png", "gradient.pdf", "gradient.md", "run.json", "tokens.csv"} <= {p.name for p in out.iterdir()}
