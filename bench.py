"""Speed of training and evaluation, measured on this machine; prints a table and writes results/bench_<device>.md.

    python bench.py [--device auto|cpu|cuda] [--quick] [--ckpt-dir FOLDER]
    python bench.py --pretrained [--device cpu]     # pretrained.py's costs: results/bench_pretrained_<device>.md
    python bench.py --pretrained --quick            # the same code on tiny models, seconds: results/quick/

Training: ms per step for H = 1, 4, 8, 16 on the fast path (on a CPU cpu_attention's fused kernel, on a GPU
PyTorch's fused attention), on the explicit-attention path the authors' code takes and, on a CPU, on the PyTorch-ops
path used without a C compiler; the same for one attention layer alone; paths timed in alternation, warm-up
excluded, median of several timings. Evaluation: the whole Section 4 evaluation (8 models x 50 sequences x all
layers) and the Tables 5-6 evaluation, with the exact estimator; the exact mixing time of one layer against the
authors' 500-walk Monte Carlo; theory.py's evaluation of one run and its largest graph; the amplification map's
random head sets (per 1000) and trained layers. On a CPU also the 8 paper cells' estimated wall time with each
scheduling (one cell on every thread, or one cell per core side by side). Uses the checkpoints in --ckpt-dir where
present, else randomly initialised models of the same size (the cost is the same). 2–2.5 minutes on a 2-core AMD EPYC.
--pretrained (lm_costs.py): on the packaged SmolLM2 and Gemma 3 270M, every study of one 1,024-token prose sample in
forward passes (the command's time less its time at 16 tokens, over the forward pass with attentions) and its peak
memory; every study of a GPT-2-small-shaped model of random weights at 1,024 tokens, section4 of a 16-layer 16-head
model at 4,096 tokens, and each study's cost on one layer against T with its log-log slope.
"""
import argparse
import os
import resource
import statistics
import sys
import time
from functools import partial
from multiprocessing import get_context

import pandas as pd
import torch

import cpu_attention
import proxies
import walks
from amplification import layer_amplification_rows
from checkpoints import build_model, checkpoint_path, load_model
from config import AMPLIFICATION_HEADS, GRAPH_SIZES, HEADS, TASKS
from evaluation import (amplification, evaluation_sequences, fresh_sequences, head_set_values, section4_values,
                        theory_rows)
from graphs import dense_heads, fully_connected_graph
from learners import group_timing_step, timing_step
from lm_costs import FULL_PLAN, QUICK_PLAN, pretrained_section
from script_io import (add_common_args, check_writable, command_line, hardware_name, portable_path, resolve_common,
                       results_folder, synchronize, write_text)
from train import estimated_training_seconds, seconds_per_step, steps_per_epoch
from transformer import MultiHeadAttention


def timed(fn, device, repeats, inner=1, warmup=2):
    """Median seconds per call of fn over `repeats` timings of `inner` calls each, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - began) / inner)
    return statistics.median(times)


def _without_kernel(step):
    with cpu_attention.disabled():
        return step()


def train_steps(cfg, heads, device):
    """One training step (forward, backward, Adam) per attention path: {path: step function}. On a CPU the fast path
    is cpu_attention's fused kernel, and "pytorch ops" is transformer.py's path for machines without a C compiler."""
    steps = {}
    for path in ["fast", "explicit"] + (["pytorch ops"] if device.type == "cpu" else []):
        torch.manual_seed(0)
        steps[path] = timing_step(cfg, heads, device, explicit_attention=path == "explicit")
        if path == "pytorch ops":
            steps[path] = partial(_without_kernel, steps[path])
    return steps


def training_paths(device):
    """What each column of the training table times."""
    explicit = "explicit: the authors' computation, which materialises the attention weights"
    if device.type == "cuda":
        return f"fast: PyTorch's fused attention (scaled_dot_product_attention); {explicit}."
    fast = ("cpu_attention's fused kernel" if cpu_attention.available() else
            f"PyTorch ops, the kernel being unavailable ({cpu_attention.unavailable_reason()})")
    return f"fast: {fast}; {explicit}; pytorch ops: transformer.py's path for machines without a C compiler."


def attention_layer_steps(cfg, heads, device):
    """Forward and backward of one multi-head attention layer (projections included, dropout on) per path."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(cfg.embed_dim, heads, cfg.dropout, causal=True).to(device).train()
    x = torch.randn(cfg.batch_size, cfg.seq_length, cfg.embed_dim, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    steps = {"fast": lambda: layer(x)[0].backward(grad), "explicit": lambda: layer(x, True)[0].backward(grad)}
    if device.type == "cpu":
        steps["pytorch ops"] = partial(_without_kernel, steps["fast"])
    return steps


def paired_step_ms(steps, device, repeats, inner):
    """Median ms per step of each path, timing the paths in alternation so that drift hits them alike."""
    times = {path: [] for path in steps}
    for step in steps.values():
        timed(step, device, 1, warmup=2)
    for _ in range(repeats):
        for path, step in steps.items():
            times[path].append(timed(step, device, 1, inner, warmup=0))
    return {path: 1000 * statistics.median(t) for path, t in times.items()}


def models_for(cfg, cells, device, ckpt_dir):
    """Checkpointed models where present, else random initialisations: same shapes, same evaluation cost."""
    models, sources = {}, set()
    for heads, task in cells:
        path = checkpoint_path(ckpt_dir, heads, task)
        if path.is_file():
            models[heads, task] = load_model(cfg, heads, path, device)[0]
            sources |= {portable_path(ckpt_dir)}
        else:
            torch.manual_seed(heads)
            models[heads, task], sources = build_model(cfg, heads).to(device).eval(), sources | {"random init"}
    return models, " + ".join(sorted(sources))


def _side_by_side_worker(cfg, head_counts, barrier, results):
    for heads in head_counts:
        seconds_per_step(cfg, heads, torch.device("cpu"), threads=1, steps=1)  # warm-up (compilation, model) alone
        barrier.wait()  # every worker times its steps at the same moment, competing for the cores as training cells do
        results.put((heads, seconds_per_step(cfg, heads, torch.device("cpu"), threads=1, steps=7)))


def side_by_side_seconds(cfg, head_counts, workers):
    """{heads: seconds per step of one cell while `workers` cells (1 thread each, one process each) train at once}:
    the median over the workers; one process per worker times every head count in turn (a process costs seconds)."""
    context = get_context("spawn")
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_side_by_side_worker, args=(cfg, head_counts, barrier, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    times = {heads: [] for heads in head_counts}
    for _ in range(workers * len(head_counts)):
        heads, seconds = results.get(timeout=600)
        times[heads].append(seconds)
    for process in processes:
        process.join()
    return {heads: statistics.median(seconds) for heads, seconds in times.items()}


def scheduling(cfg, device):
    """The 8 paper cells' estimated wall time: one cell at a time on every thread, against one cell per core on one
    thread each (the default of main.py and train.py), from measured steps of each head count."""
    cores = os.cpu_count() or 1
    cells = [h for _ in TASKS for h in HEADS]
    alone_all = {h: seconds_per_step(cfg, h, device, threads=cores, steps=7) for h in HEADS}
    alone_one = {h: seconds_per_step(cfg, h, device, threads=1, steps=7) for h in HEADS}
    side = side_by_side_seconds(cfg, HEADS, cores) if cores > 1 else alone_one
    plans = {f"one cell at a time, {cores} threads (--jobs 1 --threads {cores})": (alone_all, 1),
             f"{cores} cells side by side, 1 thread each (--jobs {cores} --threads 1, the default)": (side, cores)}
    rows = []
    for plan, (step_seconds, jobs) in plans.items():
        hours = estimated_training_seconds(cfg, cells, jobs, step_seconds) / 3600
        rows.append({"schedule": plan, **{f"{h} heads ms/step": round(1000 * step_seconds[h]) for h in HEADS},
                     "8 cells, hours": round(hours, 4), "cells per hour": round(len(cells) / hours, 3)})
    one_thread = {"schedule": "(one cell alone, 1 thread)", **{f"{h} heads ms/step": round(1000 * alone_one[h])
                                                               for h in HEADS}}
    return pd.DataFrame(rows + [one_thread])


def many_cells(cfg, device, fast_ms, repeats):
    """Wall time of the 8 paper cells and of the 40 seed-study cells, one after another or in groups of one head
    count (2 and 10 cells a group), from measured ms per step of each head count; ms per cell-step of the groups."""
    steps = cfg.epochs * steps_per_epoch(cfg)
    group_ms = {(h, m): timed(group_timing_step(cfg, h, m, device), device, repeats) * 1000 / m
                for m in (2, 10) for h in HEADS}
    rows = []
    for cells, per_group in ((8, 2), (40, 10)):
        rows.append({"cells": cells, "schedule": "one after another, one cell a step",
                     "seconds": round(per_group * steps * sum(fast_ms[h] for h in HEADS) / 1000),
                     **{f"{h} heads ms/cell-step": round(fast_ms[h], 2) for h in HEADS}})
        rows.append({"cells": cells, "schedule": f"groups of {per_group} (one per head count)",
                     "seconds": round(per_group * steps * sum(group_ms[h, per_group] for h in HEADS) / 1000),
                     **{f"{h} heads ms/cell-step": round(group_ms[h, per_group], 2) for h in HEADS}})
    return pd.DataFrame(rows)


def training_section(cfg, device, repeats, inner, configuration):
    """The training-step and attention-layer tables (every path), and on a CPU the 8 cells' schedules: Markdown lines,
    and the fast path's ms per step by head count."""
    rows = []
    for heads in HEADS:
        ms = paired_step_ms(train_steps(cfg, heads, device), device, repeats, inner)
        rows.append({"heads": heads, **{f"{path} ms/step": round(t, 2) for path, t in ms.items()},
                     "speed-up over explicit": round(ms["explicit"] / ms["fast"], 2),
                     "fast tokens/s": round(1000 * cfg.batch_size * cfg.seq_length / ms["fast"])})
        print(rows[-1])
    table = pd.DataFrame(rows)
    table["fast / 1-head fast"] = (table["fast ms/step"] / table["fast ms/step"].iloc[0]).round(2)
    layer = pd.DataFrame([{"heads": heads, **{f"{path} ms": round(t, 2) for path, t in paired_step_ms(
        attention_layer_steps(cfg, heads, device), device, repeats, 5 * inner).items()}} for heads in HEADS])
    print(layer.to_string(index=False))
    lines = ["## Training step (Adam, dropout on, float32)", "", training_paths(device), "",
             table.to_markdown(index=False), "",
             "## One attention layer, forward and backward (projections included, dropout on)", "",
             layer.to_markdown(index=False), ""]
    if device.type == "cpu":
        plans = scheduling(cfg, device)
        print(plans.to_string(index=False))
        best = plans.dropna().sort_values("cells per hour").iloc[-1]
        lines += [f"## Training the 8 {configuration} cells on this machine (estimated from measured steps of each "
                  f"head count; {cfg.epochs} epochs of {steps_per_epoch(cfg)} steps per cell)", "",
                  plans.to_markdown(index=False), "",
                  f"Best: {best['schedule']}, {best['8 cells, hours']} h for the 8 cells.", ""]
    return lines, table.set_index("heads")["fast ms/step"]


def many_cells_section(cfg, device, fast_ms, repeats):
    many = many_cells(cfg, device, fast_ms, repeats)
    print(many.to_string(index=False))
    return ["## Training many cells", "", f"Estimated from measured steps ({cfg.epochs} epochs of "
            f"{steps_per_epoch(cfg)} steps per cell): one cell after another on the fast path, or grouped "
            f"(`train.py --group yes`: the cells of each head count in one vmapped step, the groups one after "
            f"another).", "", many.to_markdown(index=False), ""]


def evaluation_timings(cfg, device, models, seed, repeats):
    """Seconds of the Section 4 and Tables 5-6 evaluations, and of the exact against the Monte Carlo mixing time on
    one layer (alone, and per layer in one batched call): table rows, and the two speed-ups."""
    cells = list(models)
    tokens = {t: evaluation_sequences(cfg, t, seed) for t in TASKS}
    section4 = timed(lambda: [section4_values(models[h, t], tokens[t], cfg) for h, t in cells], device, repeats,
                     warmup=1)
    fresh = fresh_sequences(cfg, cfg.eval_sequences, seed)
    tables = timed(lambda: [amplification(models[h, t], fresh, cfg.horizon) for t in TASKS
                            for h in AMPLIFICATION_HEADS], device, repeats, warmup=1)
    model = models[HEADS[-1], "cycle"]
    attn = model.attention(tokens["cycle"][:1])[0, -1]  # one layer: (H, T, T)
    weights = proxies.head_weights(model.layers[-1].attn)
    exact = timed(lambda: proxies.mixing_time(attn, weights, cfg.max_steps), device, 20, warmup=2)
    layers = model.attention(tokens["cycle"])  # every sequence and layer: (S, L, H, T, T)
    combined = proxies.combine_heads(layers, proxies.model_head_weights(model))[..., None, :, :]  # as main.py does
    batched = timed(lambda: proxies.mixing_time(combined, max_steps=cfg.max_steps), device, repeats) / (
        layers.shape[0] * layers.shape[1])
    exact_value = proxies.mixing_time(attn, weights, cfg.max_steps)
    began = time.perf_counter()
    mc_value = proxies.mixing_time_mc(attn, weights, cfg.num_simulations, cfg.max_steps, seed=seed)
    synchronize(device)
    mc = time.perf_counter() - began
    return [
        {"what": f"Section 4 evaluation: {len(cells)} models x {cfg.eval_sequences} sequences x {cfg.num_layers} "
                 f"layers, both proxies + normalized walk (exact)", "seconds": round(section4, 3), "value": ""},
        {"what": f"Tables 5-6 evaluation: {len(AMPLIFICATION_HEADS) * len(TASKS)} models x {cfg.eval_sequences} "
                 f"sequences, every head + combination", "seconds": round(tables, 3), "value": ""},
        {"what": f"mixing_time (exact), one layer, {HEADS[-1]} heads", "seconds": round(exact, 5),
         "value": f"{exact_value:.4f}"},
        {"what": f"mixing_time (exact), per layer, in one call on the combined matrices of all {layers.shape[0]} x "
                 f"{layers.shape[1]} layers of that model (as main.py)", "seconds": round(batched, 6), "value": ""},
        {"what": f"mixing_time_mc ({cfg.num_simulations} walks per start), same layer", "seconds": round(mc, 3),
         "value": f"{mc_value:.4f}"},
    ], (mc / exact, mc / batched)


def theory_timings(cfg, device, models, seed):
    """Seconds of theory.py's evaluation of one run (Theorem 2.9 and every prefix length) and of the epsilon-mixing
    time and converged fidelity of the largest fully connected graph of theory.py --graphs."""
    began = time.perf_counter()
    with torch.no_grad():
        theory_rows(models, cfg, seed)
    synchronize(device)
    run_seconds = time.perf_counter() - began
    n = max(GRAPH_SIZES["fully_connected"])
    graph = fully_connected_graph(n)
    began = time.perf_counter()
    mixing = walks.epsilon_mixing_time(walks.graph_walk(graph))
    fidelity, _ = proxies.converged_minimax_fidelity(walks.graph_diffusion(graph))
    graph_seconds = time.perf_counter() - began
    return [{"what": f"theory.py evaluation of one run: {len(models)} models x {cfg.eval_sequences} sequences, "
                     f"Theorem 2.9 + prefix lengths {', '.join(map(str, cfg.prefix_lengths))}",
             "seconds": round(run_seconds, 2), "value": ""},
            {"what": f"epsilon-mixing time + converged fidelity, fully connected graph, n = {n}",
             "seconds": round(graph_seconds, 2), "value": f"{mixing:.0f} steps, n phi = {n * fidelity:.3f}"}]


def amplification_timings(cfg, device, models, seed, draws=64, heads=8):
    """Seconds of theory.py --amplification's two costs: head_set_values (epsilon-mixing time included) per 1000
    random head sets of `heads` independent heads of the map's dense family at the sequence length, and the trained
    layers of one run."""
    n = cfg.seq_length
    attn = dense_heads(draws, heads, n, share=0.0, generator=torch.Generator().manual_seed(seed)).to(device)
    began = time.perf_counter()
    head_set_values(attn, None, cfg, epsilon_mixing=True)
    synchronize(device)
    per_thousand = (time.perf_counter() - began) / draws * 1000
    began = time.perf_counter()
    layer_amplification_rows(models, cfg, seed)
    synchronize(device)
    return [{"what": f"theory.py --amplification: 1000 random head sets, {heads} dense heads, n = {n} (both proxies, "
                     f"combined / parallel / best head, epsilon-mixing time)", "seconds": round(per_thousand, 2),
             "value": ""},
            {"what": f"theory.py --amplification: the trained layers of one run ({len(models)} models)",
             "seconds": round(time.perf_counter() - began, 2), "value": ""}]


def evaluation_section(cfg, device, ckpt_dir, seed, repeats):
    models, source = models_for(cfg, [(h, t) for t in TASKS for h in HEADS], device, ckpt_dir)
    rows, (alone, batched) = evaluation_timings(cfg, device, models, seed, repeats)
    rows += theory_timings(cfg, device, models, seed)
    rows += amplification_timings(cfg, device, models, seed)
    for row in rows:
        print(row)
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB GPU (max allocated)" if device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10:.0f} MiB host (max RSS)")
    return [f"## Evaluation (models: {source})", "", pd.DataFrame(rows).to_markdown(index=False), "",
            f"Exact mixing time against the {cfg.num_simulations}-walk Monte Carlo on the same layer: "
            f"{alone:.0f}x faster in a single-layer call, {batched:.0f}x per layer in a batched call.", "",
            f"Peak memory: {peak}", ""]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, out_help="output folder (default results, results/quick with --quick)")
    parser.add_argument("--pretrained", action="store_true", help="only pretrained.py's costs, on the packaged real "
                        "models and on models of random weights: results/bench_pretrained_<device>.md (about 15 "
                        "minutes on 2 cores)")
    args = parser.parse_args()
    cfg, device, ckpt_dir = resolve_common(parser, args)
    out = args.out or results_folder(args.quick)
    check_writable(parser, out)
    if args.pretrained:
        head = [f"# pretrained.py on {hardware_name(device)} ({torch.get_num_threads()} threads)", "",
                f"torch {torch.__version__}, `{command_line(sys.argv)}`", ""]
        report = "\n".join(head + pretrained_section(device, QUICK_PLAN if args.quick else FULL_PLAN))
        print(report)
        return write_text(out / f"bench_pretrained_{device.type}.md", report)
    repeats, inner = (3, 1) if args.quick else (7, 2)
    torch.manual_seed(args.seed)
    lines = [f"# Benchmark on {hardware_name(device)} ({torch.get_num_threads()} threads)", "",
             f"torch {torch.__version__}, {'quick' if args.quick else 'paper'} configuration "
             f"(batch {cfg.batch_size} x {cfg.seq_length} tokens, embed {cfg.embed_dim}, {cfg.num_layers} layers), "
             f"`{command_line(sys.argv)}`", ""]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        lines += [f"cpu_attention kernel: {cpu_attention.build()}", ""]
    training, fast_ms = training_section(cfg, device, repeats, inner, "quick" if args.quick else "paper")
    lines += training
    if device.type == "cuda" or args.quick:  # on a CPU the fused kernel's one cell per process is faster
        lines += many_cells_section(cfg, device, fast_ms, repeats)
    lines += evaluation_section(cfg, device, ckpt_dir, args.seed, repeats)
    report = "\n".join(lines)
    print("\n" + report)
    path = out / f"bench_{device.type}.md"
    write_text(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
