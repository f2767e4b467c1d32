"""What pretrained.py costs, measured for bench.py --pretrained: on the packaged real models, every study of one prose
sample against its forward pass; on GPT-2-shaped models of random weights, every study at 1,024 tokens and section4
at 4,096; each study on one layer against T. Each measurement in a process of its own, for its peak memory.
QUICK_PLAN (bench.py --pretrained --quick, seconds) runs the same code on tiny random models in this process, without
the packaged models: a check that the benchmark runs, not a measurement.

    from lm_costs import FULL_PLAN, pretrained_section
    lines = pretrained_section(torch.device("cpu"), FULL_PLAN)    # Markdown lines: the tables and what they measure
"""
import importlib
import math
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import evaluation
import hf_models
import proxies
import walks
from config import PAPER
from evaluation import STUDIES, layer_study_values
from graphs import dense_heads
from lm_analysis import input_tokens, prefix_lengths, study_values, text_file
from script_io import freed_memory_kept, synchronize


LM_SHAPES = {"GPT-2 small": dict(layers=12, heads=12, width=768), "16 x 16": dict(layers=16, heads=16, width=1024),
             "tiny": dict(layers=2, heads=4, width=64)}
COST_BUDGET_SECONDS = 120  # a study's cost table stops at the first T that takes longer


@dataclass(frozen=True)
class CostPlan:
    """What bench.py --pretrained measures: every study of a `studies_shape` model at `studies_length` tokens,
    section4 of a `big_shape` one at `big_length`, each study on one layer at `cost_lengths`, the packaged models or
    not, each measurement in a process of its own (its peak memory) or all in this one."""
    studies_shape: str = "GPT-2 small"
    studies_length: int = 1024
    big_shape: str = "16 x 16"
    big_length: int = 4096
    cost_lengths: tuple = (256, 512, 1024, 2048, 4096)
    real_models: bool = True
    own_processes: bool = True


FULL_PLAN = CostPlan()
QUICK_PLAN = CostPlan(studies_shape="tiny", studies_length=64, big_shape="tiny", big_length=128,
                      cost_lengths=(16, 32, 64), real_models=False, own_processes=False)


def peaked_lm(layers, heads, width, positions, seed=0):
    """A GPT-2-shaped model with random weights and peaked attention (queries and keys scaled by 3), eager."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=heads, n_embd=width, n_positions=positions))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :2 * width] *= 3.0
    model.set_attn_implementation("eager")
    return model.eval()


def _lm_job(shape, length, studies, device):
    """Seconds of one forward pass with output_attentions (studies None), or of the studies with the layers
    streamed, on one sequence of `length` tokens of a peaked_lm of LM_SHAPES[shape]."""
    model = peaked_lm(**LM_SHAPES[shape], positions=length).to(device)
    tokens = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    began = time.perf_counter()
    if studies is None:
        with torch.no_grad():
            model(input_ids=tokens.to(device), output_attentions=True)
    else:
        study_values(model, tokens, PAPER, studies, progress=False)
    synchronize(device)
    return time.perf_counter() - began


def _layer_job(length, study, device):
    """Seconds of one study on one layer's attention: 12 independent heads of the map's dense family (peaked softmax
    attention) at `length` tokens, one sequence."""
    attn = dense_heads(1, 12, length, share=0.0, generator=torch.Generator().manual_seed(0)).to(device)
    began = time.perf_counter()
    layer_study_values(attn, torch.ones(12, dtype=torch.float64), PAPER, (study,), prefix_lengths(length))
    synchronize(device)
    return time.perf_counter() - began


def _measured(job, args):
    """(job's seconds, this process's peak memory in GiB: resident on a CPU, allocated on a GPU)."""
    seconds = job(*args)
    if args[-1].type == "cuda":
        return seconds, torch.cuda.max_memory_allocated(args[-1]) / 2 ** 30
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def in_own_process(job, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measured, job, args).result()


def measure(plan, job, *args):
    """(seconds, peak GiB) of job(*args): in a process of its own, or in this one (peak: this process's so far)."""
    return in_own_process(job, *args) if plan.own_processes else _measured(job, args)


def cost_table(device, plan):
    """Seconds of each study on one layer against T, and the log-log slope of its last three lengths."""
    rows = []
    for study in STUDIES:
        seconds = {}
        for length in plan.cost_lengths:
            seconds[length] = measure(plan, _layer_job, length, study, device)[0]
            if seconds[length] > COST_BUDGET_SECONDS:
                break
        ts = sorted(seconds)[-3:]
        slope = np.polyfit(np.log(ts), np.log([seconds[t] for t in ts]), 1)[0] if len(ts) > 1 else math.nan
        rows.append({"study": study, **{f"T={t}": round(seconds[t], 3) if t in seconds else "–" for t in
                                        plan.cost_lengths}, "log-log slope": round(slope, 2)})
    return pd.DataFrame(rows)


def prose_sample(name, length, device):
    """(model, tokens (1, length)) of a packaged model on `device` and one prose sample, BOS as the model expects."""
    source = hf_models.model_source(name)
    model, tokenizer = hf_models.load_causal_lm(source, device), hf_models.load_tokenizer(source)
    bos = hf_models.bos_token_id(source, tokenizer, model.config)
    tokens = input_tokens("prose", samples=1, length=length, vocabulary=None, seed=0, tokenizer=tokenizer, bos=bos,
                          text=text_file("prose").read_text())
    return model, tokens


REAL_REPEATS = 5  # timings of each command and forward pass: a shared machine's noise moves one by seconds, only up


def real_model_job(name, length, device, repeats=REAL_REPEATS):
    """(forward seconds, the pretrained.py command's seconds, its peak GiB) of one prose sample of a packaged model:
    `python pretrained.py --model NAME --input prose --length LENGTH --samples 1` as a child process, every study,
    timed whole (its peak memory: the children's), then the forward pass with output_attentions (the model loaded
    first, not timed). Each the least of `repeats` timings: a 2-core machine's noise only ever adds. The commands run
    before this process loads the model: Linux counts in a child's peak the memory image it leaves at exec, with its
    parent's high-water mark (a child running `true` after its parent touched 1.5 GiB peaks at 1.5 GiB), and that
    mark was this process's forward pass with every layer's attention when the forward pass came first."""
    command = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            began = time.perf_counter()
            subprocess.run([sys.executable, "pretrained.py", "--model", name, "--input", "prose", "--length",
                            str(length), "--samples", "1", "--device", str(device), "--out", out], check=True,
                           capture_output=True, cwd=Path(__file__).resolve().parent)
            command.append(time.perf_counter() - began)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    model, tokens = prose_sample(name, length, device)
    forward = []
    for _ in range(repeats):
        began = time.perf_counter()
        with torch.no_grad():
            model(input_ids=tokens.to(device), output_attentions=True, use_cache=False, logits_to_keep=1)
        synchronize(device)
        forward.append(time.perf_counter() - began)
    return min(forward), min(command), peak


def load_job(name, cache, device):
    """Seconds to load a packaged model (source, config, tokenizer, model) onto `device` with its cached float32 copy
    (written first where there is none, not timed) or from its GGUF file itself, torch and transformers imported."""
    importlib.import_module("transformers").AutoModelForCausalLM  # imported before the clock, as a script's start
    if cache:
        hf_models.load_tokenizer(hf_models.model_source(name))  # the copy exists afterwards
    began = time.perf_counter()
    source = hf_models.model_source(name)
    config = hf_models.model_config(source, cache)
    hf_models.load_tokenizer(source, cache=cache)
    hf_models.load_causal_lm(source, device, config, cache=cache)
    synchronize(device)
    return time.perf_counter() - began


PARTS = {"fidelity steps": [(proxies, "_certified_fidelities")], "mixing-time steps": [(proxies,
         "_capped_steps_by_stepping")], "walks built": [(proxies, "walk_transition"), (proxies, "_walk_steps"),
                                                         (walks, "head_walks"), (walks, "_layer_walks")],
         "epsilon-mixing steps": [(walks, "_first_mixed_steps")], "heads combined": [(proxies, "weighted_sum"),
         (walks, "weighted_sum")], "head diversity": [(evaluation, "head_diversity")]}


@contextmanager
def timed_parts(seconds):
    """Within it, each function of PARTS adds its time to seconds[part] (none of them calls another at a language
    model's length: _walk_steps falls back on walk_transition only at T <= proxies.STEP_BLOCK)."""
    def timed(part, function):
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[part] += time.perf_counter() - began
        return run
    originals = [(module, attribute, getattr(module, attribute)) for places in PARTS.values()
                 for module, attribute in places]
    for part, places in PARTS.items():
        for module, attribute in places:
            setattr(module, attribute, timed(part, getattr(module, attribute)))
    try:
        yield
    finally:
        for module, attribute, function in originals:
            setattr(module, attribute, function)


def profile_job(name, length, device):
    """Where the time of each study goes on one prose sample of a packaged model: [{study, seconds over its layers,
    the slowest layer, each PARTS' seconds}], every study alone on each layer's attention (kept from one pass)."""
    model, tokens = prose_sample(name, length, device)
    layers, weights = {}, hf_models.head_weights(model)
    hf_models.stream_attention(model, tokens, lambda i, attn: layers.__setitem__(i, attn.clone()))
    rows = []
    for study in STUDIES:
        seconds, per_layer = {part: 0.0 for part in PARTS}, []
        with timed_parts(seconds), freed_memory_kept():
            for i, attn in layers.items():
                began = time.perf_counter()
                layer_study_values(attn, weights[i], PAPER, (study,), prefix_lengths(length))
                synchronize(device)
                per_layer.append(time.perf_counter() - began)
        rows.append({"study": study, "seconds": sum(per_layer), "slowest layer (s)": max(per_layer),
                     "slowest layer": 1 + int(np.argmax(per_layer)), **seconds})
    return rows


REAL_GOALS = {"smollm2": 3.0, "gemma3-270m": 4.0}  # GiB: the peak each may take at 1,024 tokens
REAL_LENGTH, FIXED_LENGTH = 1024, 16  # the fixed cost of a run is its time at 16 tokens


def real_models_table(device):
    """Each packaged model: every study of one prose sample of 1,024 tokens, in forward passes with attentions (the
    command's time less its time at 16 tokens, over the forward pass measured in the same process; each the least of
    REAL_REPEATS timings), and its peak memory against REAL_GOALS."""
    rows = []
    for name, goal in REAL_GOALS.items():
        (forward, command, peak), _ = in_own_process(real_model_job, name, REAL_LENGTH, device)
        (_, fixed, _), _ = in_own_process(real_model_job, name, FIXED_LENGTH, device)
        loads = {cache: min(in_own_process(load_job, name, cache, device)[0] for _ in range(2))
                 for cache in (False, True)}
        rows.append({"model": name, "forward pass with attentions (s)": forward, "command (s)": command,
                     f"the same at {FIXED_LENGTH} tokens (s)": fixed, "studies in forward passes":
                     (command - fixed) / forward, "peak GiB": peak, "goal GiB": goal,
                     "load from the GGUF file (s)": loads[False], "load from the cached copy (s)": loads[True]})
    return pd.DataFrame(rows).round(2)


def profile_table(device):
    """profile_job of each packaged model at REAL_LENGTH, in a process of its own."""
    return pd.concat([pd.DataFrame(in_own_process(profile_job, name, REAL_LENGTH, device)[0]).assign(model=name)
                      for name in REAL_GOALS])[["model", "study", "seconds", "slowest layer (s)", "slowest layer",
                                                *PARTS]].round(2)


def pretrained_section(device, plan=FULL_PLAN):
    """The goals of pretrained.py: on the packaged models, every study of one 1,024-token prose sample within 10
    forward passes and REAL_GOALS; a GPT-2-small-shaped model of random weights at T = 1024 within 20 forward passes
    and 3 GiB; section4 of a 16-layer 16-head model at T = 4096 within 8 GiB; each study's cost against T. With
    QUICK_PLAN the same tables of tiny models, the packaged models left out."""
    small, big = plan.studies_shape, plan.big_shape
    forward, forward_gib = measure(plan, _lm_job, small, plan.studies_length, None, device)
    studies, studies_gib = measure(plan, _lm_job, small, plan.studies_length, STUDIES, device)
    big_seconds, big_gib = measure(plan, _lm_job, big, plan.big_length, ("section4",), device)
    table = pd.DataFrame([
        {"what": f"{small} shape, T = {plan.studies_length}: one forward pass with output_attentions",
         "seconds": forward, "peak GiB": forward_gib},
        {"what": f"the same, every study, layers streamed ({studies / forward:.1f} forward passes)",
         "seconds": studies, "peak GiB": studies_gib},
        {"what": "{layers} layers x {heads} heads (width {width}), T = ".format(**LM_SHAPES[big]) +
                 f"{plan.big_length}: section4, layers streamed", "seconds": big_seconds, "peak GiB": big_gib}]).round(2)
    where = ("in a process of its own (peak: its resident memory)" if plan.own_processes else
             "in this process, tiny models (--quick: a check that the benchmark runs, not a measurement)")
    real = (["## The packaged models (pretrained.py --input prose --length 1024 --samples 1)", "", "Each row's "
             "measurements in processes of their own (peak: the command's resident memory; loads: model_source, "
             "config, tokenizer and model, torch and transformers imported, the least of two).", "",
             real_models_table(device).to_markdown(index=False), "", "Where the studies' time goes: each study "
             "alone on every layer of the same sample (seconds over the layers; the parts' seconds are within "
             "them, every study's own steps counted where they run):", "", profile_table(device).to_markdown(
                 index=False), ""]
            if plan.real_models else ["## The packaged models: left out with --quick", ""])
    return real + ["## Hugging Face models of random weights", "", f"Peaked attention, one sequence; each row {where}"
                   ".", "", table.to_markdown(index=False), "", "Each study on one layer (12 heads of the amplification "
                   "map's dense family) against T, seconds; the slope over the last three lengths measured (a study "
                   f"stops at the first T over {COST_BUDGET_SECONDS} s):", "",
                   cost_table(device, plan).to_markdown(index=False), ""]
