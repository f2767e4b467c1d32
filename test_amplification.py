"""Tables 5 and 6: does a layer's learned-weight combination of heads beat its best single head (minimax fidelity)?

    python test_amplification.py [--samples 50] [--ckpt-dir checkpoints] [--out results] [--quick]
    python test_amplification.py --seeds 0 1 2 3 4     # every training run: results/seeds/tables56_*

For heads 4, 8, 16, layers 1-4, tasks copy (Table 5) and cycle (Table 6): best individual fidelity = max over heads
of one head's minimax fidelity; combined fidelity = the layer's minimax fidelity with learned head weights.
The paper's protocol scores one fresh random sequence (the authors drew it without a seed; here it is sample 0 of a
seeded draw). Beside it: the mean over --samples fresh sequences, in how many the combination wins, the win rate
with its Wilson 95% interval and the two-sided sign-test p-value of "combined beats the best head" (ties left out).
Writes table5_copy.{csv,md} and table6_cycle.{csv,md} under --out. With --seeds, every training run (each on the
fresh sequences of its own seed), into OUT/seeds/: tables56_runs (one row per run, both tasks), tables56_across_runs
(mean, std and t-interval over our runs, the authors' beside) and the claims (main.write_claims).
"""
import argparse

import numpy as np
import pandas as pd
import torch
from scipy import stats

import proxies
from config import AMPLIFICATION_HEADS
from main import evaluate_runs, models_of, write_claims
from script_io import across_runs, across_runs_view, add_evaluation_args, resolve_common, save_table

TABLE_NAMES = {"copy": "table5_copy", "cycle": "table6_cycle"}
ACROSS_RUNS = {q: q for q in ("best_individual_%", "combined_%", "mean_best_individual_%", "mean_combined_%",
                              "win_rate")}


def fresh_sequences(cfg, samples, seed):
    """Random sequences not drawn from the training set, as in the authors' test; sample 0 is the paper's one."""
    return torch.randint(0, cfg.vocab_size, (samples, cfg.seq_length), generator=torch.Generator().manual_seed(seed))


def amplification(model, tokens, horizon):
    """Best single-head and combined minimax fidelity, (S, L) each, for S sequences."""
    attn = model.attention(tokens)  # (S, L, H, T, T)
    combined = proxies.minimax_fidelity(attn, proxies.model_head_weights(model), horizon)
    per_head = proxies.minimax_fidelity(attn[..., None, :, :], horizon=horizon)  # each head alone: (S, L, H)
    return per_head.max(axis=-1), combined


def win_statistics(combined, best):
    """Wins of the combination over the best head across samples: the win rate with its Wilson 95% interval, and
    the two-sided sign-test p-value of "combined beats the best head" (binomial, p = 1/2, ties left out)."""
    wins, ties, n = int((combined > best).sum()), int((combined == best).sum()), len(best)
    interval = stats.binomtest(wins, n).proportion_ci(confidence_level=0.95, method="wilson")
    decided = n - ties
    p_value = stats.binomtest(wins, decided, 0.5).pvalue if decided else 1.0
    return {"wins": wins, "ties": ties, "samples": n, "win_rate": wins / n, "win_ci_low": interval.low,
            "win_ci_high": interval.high, "p_value": p_value}


def table_rows(task, heads, best, combined):
    return [{"task": task, "heads": heads, "layer": layer + 1,
             "best_individual_%": best[0, layer], "combined_%": combined[0, layer],
             "amplification": bool(combined[0, layer] > best[0, layer]),
             "mean_best_individual_%": best[:, layer].mean(), "mean_combined_%": combined[:, layer].mean(),
             **win_statistics(combined[:, layer], best[:, layer])}
            for layer in range(best.shape[1])]


def markdown_view(table):
    two = lambda col: [f"{v:.2f}%" for v in table[col]]
    return pd.DataFrame({"heads": table.heads, "layer": table.layer,
                         "best individual": two("best_individual_%"), "combined": two("combined_%"),
                         "combined > best": np.where(table.amplification, "yes", "no"),
                         "mean best individual": two("mean_best_individual_%"),
                         "mean combined": two("mean_combined_%"),
                         "wins": [f"{w}/{n}" for w, n in zip(table.wins, table.samples)],
                         "win rate (95% Wilson)": [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                                                   zip(table.win_rate, table.win_ci_low, table.win_ci_high)],
                         "p (sign test)": [f"{p:.2g}" for p in table.p_value]})


def amplification_rows(models, cfg, samples, seed):
    """table_rows of every (heads, task) model, on `samples` fresh sequences drawn from `seed`."""
    tokens = fresh_sequences(cfg, samples, seed)
    return [row for (heads, task), model in models.items()
            for row in table_rows(task, heads, *amplification(model, tokens, cfg.horizon))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_args(parser, AMPLIFICATION_HEADS)
    parser.add_argument("--samples", type=int, default=50, help="fresh sequences for the mean (sample 0 = the paper's)")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples}")
    if min(args.heads) < 2:
        parser.error(f"--heads: Tables 5-6 compare a combination of heads with its single heads, so every head "
                     f"count must be at least 2, got {min(args.heads)}")
    cfg, device, ckpt_dir, out = resolve_common(parser, args, default_out="results")
    cells = [(h, t) for t in args.tasks for h in args.heads]
    if args.seeds is not None:
        per_run = evaluate_runs(parser, args, cfg, device, ckpt_dir, cells,
                                lambda models, seed: amplification_rows(models, cfg, args.samples, seed))
        across = across_runs(per_run, ["task", "heads", "layer"], ACROSS_RUNS)
        save_table(per_run, out / "tables56_runs", view=pd.concat([per_run[["run", "task"]], markdown_view(per_run)],
                                                                    axis=1))
        save_table(across, out / "tables56_across_runs", view=across_runs_view(across))
        write_claims(out)
        print(f"wrote {out}/tables56_runs.*, tables56_across_runs.*, claims.*")
        return
    rows = amplification_rows(models_of(parser, args, cfg, device, ckpt_dir, cells), cfg, args.samples, args.seed)
    for r in rows:
        if r["layer"] == 1:
            print(f"\n{r['heads']} heads, {r['task']}:")
        print(f"Layer {r['layer']}: Best individual fidelity: {r['best_individual_%']:.2f}%, "
              f"Combined fidelity: {r['combined_%']:.2f}%, Amplification: {r['amplification']} "
              f"| mean over {r['samples']}: {r['mean_best_individual_%']:.2f}% vs "
              f"{r['mean_combined_%']:.2f}%, combined wins {r['wins']}/{r['samples']}")
    table = pd.DataFrame(rows)
    for task in args.tasks:
        part = table[table.task == task].reset_index(drop=True)
        save_table(part, out / TABLE_NAMES[task], view=markdown_view(part))
        print(f"wrote {out}/{TABLE_NAMES[task]}.csv, .md")


if __name__ == "__main__":
    main()
