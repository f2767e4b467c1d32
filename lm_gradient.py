"""Do the paper's attention graphs track what a language model actually passes to its last token? The model's own
sensitivity of its last hidden state to each input position, against two attention-graph predictions and against
position alone (pretrained.py --studies gradient).

    from lm_gradient import gradient_values, gradient_tables
    values = gradient_values(model, tokens, PAPER, directions=8, seed=42)   # per sample (S, T) arrays and rho
    tables = gradient_tables(values, kind="prose")   # {"gradient": per predictor, "gradient_positions": per j}

Per sample of T tokens:
    sensitivity  s_j = RMS over K random unit vectors u (seeded) of ||d(u . h_{T-1}) / d e_j||: h_{T-1} the model's
                 last hidden state at the last position (after its final norm: what the language-model head reads),
                 e_j the input embedding of position j; one backward pass per u. E_u ||J_j^T u||^2 = ||J_j||_F^2 / d,
                 so s_j estimates the Jacobian's Frobenius norm over sqrt(d).
    rollout      Abnar & Zuidema's attention rollout of the whole model, R = M_L ... M_1 with M_l = 1/2 C_l + 1/2 I
                 and C_l = sum_h w_h A_h (the paper's head weights): row T-1 of R.
    reach        per layer l, the paper's phi_j = max over t = 1..horizon of (C_l^t)[T-1, j]: the per-node fidelity
                 whose minimum over j is the layer's minimax fidelity.
    recency      -(T-1-j): position alone.
Each prediction's Spearman rho with s over j >= 1 (position 0, the sink, apart) and over every j. The tables give
each predictor's mean rho over samples with its t 95% interval, and each graph prediction against recency, paired
over samples (Wilcoxon). Every layer takes part (rollout needs them all), whatever --layers says.
"""
import numpy as np
import pandas as pd
import torch
from scipy import stats

from evaluation import paired, t_interval
from hf_models import head_weights, stream_attention
from proxies import combine_heads, per_node_fidelity

GRADIENT_STUDY = "gradient"
POSITIONS = {"after_first": slice(1, None), "all": slice(None)}  # j >= 1 (the sink apart), and every j


def unit_directions(count, width, seed):
    """(count, width) float64 random unit vectors, seeded: the u of the sensitivity."""
    u = torch.randn(count, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm(dim=-1, keepdim=True)


def sensitivity(model, ids, directions):
    """s_j (T,) float64: RMS over the rows u of directions of ||d(u . h_{T-1}) / d e_j||, through the model's decoder
    from its input embeddings (ids (1, T)): one forward pass, then a backward pass a direction."""
    with torch.no_grad():
        embedded = model.get_input_embeddings()(ids.to(model.device))
    x = embedded.detach().clone().requires_grad_(True)
    last = model.base_model(inputs_embeds=x, use_cache=False).last_hidden_state[0, -1]
    total = torch.zeros(ids.shape[1], dtype=torch.float64)
    for k, u in enumerate(directions):
        grad, = torch.autograd.grad(last, x, grad_outputs=u.to(last), retain_graph=k < len(directions) - 1)
        total += grad[0].double().square().sum(-1).cpu()
    return (total / len(directions)).sqrt()


def graph_predictions(model, ids, cfg):
    """{"rollout": (T,), "reach": (L, T)} float64 of one sample (ids (1, T)), every layer's attention streamed."""
    weights, combined, reach = head_weights(model), [], []

    def on_layer(i, attn):
        C = combine_heads(attn.double().cpu(), weights[i])[0]  # (T, T)
        combined.append(C)
        reach.append(per_node_fidelity(C, None, cfg.horizon))
    stream_attention(model, ids, on_layer)
    return {"rollout": rollout_row(combined), "reach": np.stack(reach)}


def rollout_row(combined):
    """Row T-1 of the rollout M_L ... M_1, M_l = 1/2 C_l + 1/2 I, of the layers' combined matrices (first layer first),
    as a vector stepped from the last layer down: (T,) float64."""
    row = torch.zeros(combined[0].shape[-1], dtype=torch.float64)
    row[-1] = 1.0
    for C in reversed(combined):
        row = 0.5 * (row @ torch.as_tensor(C, dtype=torch.float64)) + 0.5 * row
    return row.numpy()


def spearman(prediction, measured):
    """Spearman's rho of a prediction with the measured sensitivity over each of POSITIONS: {positions: rho}."""
    return {name: float(stats.spearmanr(prediction[part], measured[part]).statistic)
            for name, part in POSITIONS.items()}


def gradient_values(model, tokens, cfg, *, directions, seed):
    """{"sensitivity": (S, T), "rollout": (S, T), "rho": {(predictor, positions): (S,)}} over the samples of tokens
    (S, T); predictors: rollout, recency and reach_<layer> (1-indexed); directions: K."""
    T = tokens.shape[1]
    recency = -(T - 1 - np.arange(T, dtype=float))
    u = unit_directions(directions, model.get_input_embeddings().embedding_dim, seed)
    found = {"sensitivity": [], "rollout": [], "rho": {}}
    for sample in tokens:
        ids = sample[None]
        measured = sensitivity(model, ids, u).numpy()
        predicted = graph_predictions(model, ids, cfg)
        found["sensitivity"].append(measured)
        found["rollout"].append(predicted["rollout"])
        named = {"rollout": predicted["rollout"], "recency": recency,
                 **{f"reach_{layer + 1}": r for layer, r in enumerate(predicted["reach"])}}
        for predictor, prediction in named.items():
            for positions, rho in spearman(prediction, measured).items():
                found["rho"].setdefault((predictor, positions), []).append(rho)
    return {"sensitivity": np.stack(found["sensitivity"]), "rollout": np.stack(found["rollout"]),
            "rho": {key: np.array(rhos) for key, rhos in found["rho"].items()}}


def gradient_tables(values, *, kind):
    """{"gradient": one row per predictor and positions: rho's mean and t 95% interval over samples, and against
    recency's rho (paired: mean difference, interval, Wilcoxon p); "gradient_positions": each sample's sensitivity
    and rollout per position}."""
    rows = []
    for (predictor, positions), rho in values["rho"].items():
        mean, low, high = t_interval(rho)
        row = {"input": kind, "predictor": predictor, "layer": int(predictor[6:]) if predictor[:6] == "reach_" else
               None, "positions": positions, "rho_mean": mean, "rho_ci_low": low, "rho_ci_high": high,
               "samples": len(rho)}
        if predictor != "recency":
            difference = rho - values["rho"][("recency", positions)]
            gain, gain_low, gain_high, p_value = paired(difference)
            row.update(over_recency=gain, over_recency_ci_low=gain_low, over_recency_ci_high=gain_high,
                       over_recency_p=p_value, samples_over_recency=int((difference > 0).sum()))
        rows.append(row)
    S, T = values["sensitivity"].shape
    positions = pd.DataFrame({"sample": np.repeat(np.arange(S), T), "position": np.tile(np.arange(T), S),
                              "sensitivity": values["sensitivity"].reshape(-1),
                              "rollout": values["rollout"].reshape(-1)})
    return {"gradient": pd.DataFrame(rows), "gradient_positions": positions}
