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
(mean, std and t-interval over our runs, the authors' beside) and the claims (claims.py). The evaluation itself:
evaluation.tables56_rows.
"""
import argparse

import numpy as np
import pandas as pd

from config import AMPLIFICATION_HEADS
from evaluation import tables56_rows
from runs import evaluate_runs, runs_of, write_study
from script_io import add_evaluation_args, authors_checkpoints, input_errors, resolve_evaluation, save_table
from train import models_of

TABLE_NAMES = {"copy": "table5_copy", "cycle": "table6_cycle"}
ACROSS_RUNS = {q: q for q in ("best_individual_%", "combined_%", "mean_best_individual_%", "mean_combined_%",
                              "win_rate")}


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
    cfg, device, ckpt_dir, out = resolve_evaluation(parser, args)
    cells = [(h, t) for t in args.tasks for h in args.heads]
    if args.seeds is not None:
        runs = runs_of(args.seed, args.seeds, ckpt_dir, authors=authors_checkpoints(parser, args))
        with input_errors(parser):
            per_run = evaluate_runs(cfg, cells, runs, device,
                                    lambda models, seed: tables56_rows(models, cfg, args.samples, seed))
        write_study(per_run, out, stem="tables56", keys=["task", "heads", "layer"], values=ACROSS_RUNS,
                    name="quantity", view=lambda t: pd.concat([t[["run", "task"]], markdown_view(t)], axis=1))
        print(f"wrote {out}/tables56_runs.*, tables56_across_runs.*, claims.*")
        return
    with input_errors(parser):
        rows = tables56_rows(models_of(cfg, cells, args, device, ckpt_dir), cfg, args.samples, args.seed)
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
