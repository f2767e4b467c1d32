"""pretrained.py --quantisation: Q8_0 rounding written out from its definition (llama.cpp's quantize_row_q8_0_ref),
the matrices it touches named by hand, the weights restored, the KL divergence by hand, the changes and flips of
constructed tables, and an end-to-end run whose file values are a plain run's on the same tokens."""
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import lm_quantisation  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


def tiny_llama(intermediate=64):
    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=intermediate,
                                      max_position_embeddings=64, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def q8_0(matrix):
    """Blocks of 32 along each row: d = max |x| / 127, q = x / d rounded half away from zero, x' = q d with d
    stored as float16."""
    blocks = matrix.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(1, keepdims=True) / np.float32(127)
    scaled = blocks * np.where(d == 0, 0, 1 / d)
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(matrix.shape)


def test_q8_0_rounds_every_attention_and_mlp_matrix_and_nothing_else():
    model = tiny_llama()
    rounded, rms = lm_quantisation.requantised_weights(model, "Q8_0")
    assert set(rounded) == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in MATRICES}
    state, change, total = model.state_dict(), 0.0, 0.0
    for name, weight in rounded.items():
        original = state[name].numpy()
        assert np.allclose(weight.numpy(), q8_0(original), rtol=0, atol=1e-7), name
        change += ((weight.double().numpy() - original) ** 2).sum()
        total += (original.astype(float) ** 2).sum()
    assert rms == pytest.approx(math.sqrt(change / total), rel=1e-9) and 0 < rms < 0.01
    assert lm_quantisation.requantised_weights(model, "Q4_0")[1] > lm_quantisation.requantised_weights(model, "Q5_0")[1]


def test_swapped_puts_the_models_own_weights_back():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rounded, _ = lm_quantisation.requantised_weights(model, "Q4_0")
    name = next(iter(rounded))
    with lm_quantisation.swapped(model, rounded):
        assert torch.equal(model.state_dict()[name], rounded[name]) and not torch.equal(rounded[name], before[name])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_kl_per_token_by_hand_and_in_chunks():
    """Logits (0, ln 2) against (0, 0): p = (1/3, 2/3), q = (1/2, 1/2), KL = 1/3 ln(2/3) + 2/3 ln(4/3); identical
    logits give 0; three positions in chunks of 2 average the same as at once."""
    by_hand = 1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3)
    p = torch.tensor([[[0.0, math.log(2)]]], dtype=torch.float64)
    assert lm_quantisation.kl_per_token(p, torch.zeros(1, 1, 2)).item() == pytest.approx(by_hand, rel=1e-12)
    three = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    other = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(1))
    assert lm_quantisation.kl_per_token(three, three).item() == pytest.approx(0, abs=1e-15)
    assert lm_quantisation.kl_per_token(three, other, chunk=2).item() == pytest.approx(
        lm_quantisation.kl_per_token(three, other, chunk=3).item(), rel=1e-12)


def test_changes_and_flips_of_constructed_tables():
    """Layer 1's fidelity 2 -> 3 is +50%, layer 2's 4 -> 3 is -25%; the win verdict (win rate > 1/2) flips in layer
    2 only, synergy's sign (fidelity rows only) in layer 1 only (-0.2 -> -0.1 is +50%), a sink head crossing 0.3
    once."""
    def tables(fidelity, win_rate, synergy, head):
        return {"section4": pd.DataFrame({"layer": [1, 2], "fidelity_mean": fidelity}),
                "tables56": pd.DataFrame({"layer": [1, 2], "win_rate": win_rate}),
                "synergy": pd.DataFrame({"layer": [1, 2, 1, 2], "proxy": ["fidelity"] * 2 + ["mixing_time"] * 2,
                                         "synergy": synergy}),
                "sink": pd.DataFrame({"layer": [1, 2], "head_1": head, "head_2": [0.9, 0.9]})}
    file = tables([2.0, 4.0], [0.75, 0.625], [0.1, -0.2, 5.0, 5.0], [0.1, 0.5])
    rounded = tables([3.0, 3.0], [0.75, 0.5], [-0.1, -0.1, -5.0, 5.0], [0.35, 0.5])
    changes, flips = lm_quantisation.compared(file, rounded)
    fidelity = changes[changes.proxy == "fidelity_mean"].set_index("layer").relative_change
    assert fidelity.to_dict() == {1: pytest.approx(0.5), 2: pytest.approx(-0.25)}
    assert changes[changes.proxy == "synergy"].relative_change.tolist() == [pytest.approx(-2.0), pytest.approx(0.5)]
    flipped = {(r.verdict, r.layer, r.head if isinstance(r.head, str) else None)  # a layer's verdict: no head
               for r in flips[flips.flipped].itertuples()}
    assert flipped == {("beats its best head in most samples", 2, None), ("fidelity synergy > 0", 1, None),
                       ("sink head (Gu et al.)", 1, "head_1")}
    assert len(flips) == 2 + 2 + 4


def test_quantisation_end_to_end_and_its_file_values_are_a_plain_runs(tmp_path, run_ok, run_main):
    """--quantisation on a saved tiny Llama: quantisation.csv has a row a quantiser, its flips counted from
    flips.csv; changes.csv's file values are those of a plain run on the same tokens; the output KL grows with
    coarser rounding. A matrix whose rows are not whole blocks of 32, and --quantisation with
    --without-first-token, are one line each."""
    tiny_llama().save_pretrained(tmp_path / "llama")
    common = ("--model", tmp_path / "llama", "--input", "random", "--quick", "--seed", 3)
    run_ok("pretrained.py", *common, "--quantisation", "--out", tmp_path / "q")
    run_ok("pretrained.py", *common, "--out", tmp_path / "plain")
    folder = tmp_path / "q" / "llama" / "random"
    summary = pd.read_csv(folder / "quantisation.csv").set_index("quantiser")
    flips, changes = pd.read_csv(folder / "flips.csv"), pd.read_csv(folder / "changes.csv")
    assert list(summary.index) == ["Q8_0", "Q5_0", "Q4_0"]
    for (quantiser, verdict), part in flips.groupby(["quantiser", "verdict"]):
        assert summary.loc[quantiser, f"flipped.{verdict}"] == part.flipped.sum()
    plain = pd.read_csv(tmp_path / "plain" / "llama" / "random" / "section4.csv")
    mine = changes[(changes.quantiser == "Q4_0") & (changes.proxy == "fidelity_mean")]
    assert np.allclose(mine.file.to_numpy(), plain.fidelity_mean.to_numpy(), rtol=1e-12)
    assert summary.kl_mean["Q8_0"] < summary.kl_mean["Q4_0"]
    assert {"quantisation.png", "quantisation.md", "run.json", "tokens.csv"} <= {p.name for p in folder.iterdir()}
    tiny_llama(intermediate=40).save_pretrained(tmp_path / "odd")
    code, _, err = run_main("pretrained.py", "--model", tmp_path / "odd", "--quick", "--quantisation", "--out",
                            tmp_path / "x")
    assert code == 2 and "not whole blocks of 32" in err.strip().splitlines()[-1] and "Traceback" not in err
    code, _, err = run_main("pretrained.py", *common, "--quantisation", "--without-first-token")
    assert code == 2 and "--quantisation compares" in err
