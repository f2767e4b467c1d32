"""Train one (heads, task) cell of Section 4 and save its checkpoint; also the checkpoint I/O.

    python train.py --heads 4 --task copy [--epochs 200] [--device auto] [--seed 42] [--resume] [--quick]
    python train.py [--heads 1 4 8 16] [--task copy cycle] [--seeds 0 1 2 3 4] [--jobs 8] [--time-budget 6]
    python train.py --seeds 0 1 2 3 4 --status    # what is trained, what is left and the hours it will take

writes checkpoints/4_heads_copy.pt (checkpoints/quick/ with --quick); with --seeds, checkpoints/seeds/seed_S/.
The task's data depends only on (seed, task); initialisation, dropout and shuffling are seeded from
(seed, heads, task). A cell's CPU arithmetic depends on its intra-op thread count (--threads; default: the cores
shared among the cells that train at once; recorded in the checkpoint): with the same --threads a cell gives the same
model whether it is trained alone, in any order, or in parallel with others.
--time-budget stops training before the budget runs out, each unfinished cell saving its resume state.
"""
import argparse
import contextlib
import copy
import dataclasses
import os
import platform
import re
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from config import CKPT_DIR, FORMAT, HEADS, PAPER, QUICK, SEED, TASKS
from script_io import add_common_args, add_training_args, deadline_of, resolve_common, write_atomic
from sequence_datasets import make_dataset
from transformer import Transformer


def build_model(cfg, heads):
    return Transformer(cfg.vocab_size, cfg.embed_dim, heads, cfg.num_layers, cfg.mlp_hidden_dim, cfg.seq_length,
                       dropout=cfg.dropout)


def hardware_name(device):
    """The GPU's or CPU's model name, for the training facts and the benchmark."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return names[0] if names else (platform.processor() or platform.machine())


@contextlib.contextmanager
def intra_op_threads(threads):
    """torch's intra-op thread count set to `threads` (None: left as it is) inside the block, restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_jobs(jobs, cells):
    """--jobs as given, else one worker per CPU core, at most one per cell."""
    return jobs or min(len(cells), os.cpu_count() or 1)


def default_threads(threads, cells_at_once):
    """--threads as given, else the CPU's cores shared among the cells that train at once (at least 1 each)."""
    return threads or max(1, (os.cpu_count() or 1) // cells_at_once)


def cell_seed(seed, heads, task):
    """A stable per-cell seed (Python's hash() of a string changes between runs; CRC-32 does not)."""
    return zlib.crc32(f"{seed}/{heads}/{task}".encode())


def checkpoint_path(ckpt_dir, heads, task):
    return Path(ckpt_dir) / f"{heads}_heads_{task}.pt"


def resume_path_of(path):
    """Where an unfinished cell keeps its resume state: beside its checkpoint path, with .resume appended."""
    return path.with_name(path.name + ".resume")


def save_checkpoint(path, obj):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _read(path, device):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: expected a file written by train.py "
                                f"or one of the authors' {{H}}_heads_{{task}}.pt state_dicts")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint (truncated or foreign file?): "
                         f"{type(error).__name__}: {str(error)[:200]}") from error


def load_checkpoint(model, path, device="cpu"):
    """Load weights from this repo's format or the authors' plain state_dict; returns the stored training facts.

    Every head count has the same weight shapes, so the head count is checked: against the stored config, or for
    the authors' files against the {H}_heads_{task}.pt name.
    """
    path = Path(path)
    obj = _read(path, device)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state, facts = obj["state_dict"], obj.get("training", {})
        differ = {k: (obj["config"].get(k), v) for k, v in model.config.items() if obj["config"].get(k) != v}
        if differ:
            raise ValueError(f"{path} holds a different model: " + ", ".join(
                f"{k}={stored} in the file but {k}={wanted} expected" for k, (stored, wanted) in differ.items()))
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, facts = obj, {"source": "plain state_dict (the authors' format)"}
        name = re.fullmatch(r"(\d+)_heads_\w+\.pt", path.name)
        if name is None:
            raise ValueError(f"{path} is a plain state_dict, whose head count can only be read from a file name of "
                             f"the form {{H}}_heads_{{task}}.pt; rename it so")
        if int(name[1]) != model.config["num_heads"]:
            raise ValueError(f"{path} holds a {name[1]}-head model but the model expects "
                             f"{model.config['num_heads']} heads")
    else:
        raise ValueError(f"{path} is neither a checkpoint of this repo (format {FORMAT!r}) nor a plain state_dict")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit the model: missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state)
    return facts


def _rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def make_optimizer(parameters, cfg, device):
    """Adam over `parameters` (a model's, or a group's stacked ones) at the config's learning rate; fused on CUDA."""
    return torch.optim.Adam(list(parameters), lr=cfg.lr, **({"fused": True} if device.type == "cuda" else {}))


def train_step(model, optimizer, inputs, targets, explicit_attention=False):
    """One Adam step on a batch, cross-entropy over all positions; returns the loss as a device tensor (no host
    sync). explicit_attention=True takes the authors' explicit attention path instead of the fused one."""
    out = model(inputs, return_attn=explicit_attention)
    logits = out[0] if explicit_attention else out
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_cell(cfg, heads, task, seed=SEED, device="cpu", ckpt_dir=CKPT_DIR, resume=False, save_every=10,
               tf32=False, compile=False, progress=True, log=print, deadline=None, threads=None):
    """Train one cell and write its checkpoint atomically; with resume, continue from its last saved epoch (a cell
    whose checkpoint exists is finished: skipped, its path returned).

    threads: intra-op threads for this cell (None: leave torch's setting); recorded, since CPU results depend on it.
    deadline: a time.time() by which training stops: when the next epoch would end after it, the resume state is
    saved and None is returned instead of the checkpoint's path; a session's first epoch, which has no measured
    length to plan with, is dropped (nothing saved) if the deadline passes during it."""
    device = torch.device(device)
    path = checkpoint_path(ckpt_dir, heads, task)
    resume_path = resume_path_of(path)
    if resume and path.is_file():  # finished earlier (a resume state beside it is stale): go on with the rest
        log(f"{path.stem}: already trained ({path}), skipped")
        return path
    with intra_op_threads(threads):
        return _train(cfg, heads, task, seed, device, path, resume_path, resume, save_every, tf32, compile, progress,
                      log, deadline)


def _train(cfg, heads, task, seed, device, path, resume_path, resume, save_every, tf32, compile, progress, log,
           deadline):
    if device.type == "cuda":  # the paper is float32: TF32 only on request
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    data = make_dataset(task, cfg.num_sequences, cfg.seq_length, cfg.vocab_size, seed)
    inputs, targets = data.inputs.to(device), data.targets.to(device)
    cseed = cell_seed(seed, heads, task)
    torch.manual_seed(cseed)  # initialisation and dropout
    model = build_model(cfg, heads).to(device)
    optimizer = make_optimizer(model.parameters(), cfg, device)
    shuffle = torch.Generator().manual_seed(cseed)
    losses, start, sessions = [], 0, []
    run = dict(heads=heads, task=task, seed=seed, hyperparameters=dataclasses.asdict(cfg))
    if resume and resume_path.is_file():
        state = _read(resume_path, device)
        if state.get("run") != run:
            raise ValueError(f"{resume_path} belongs to another run ({state.get('run')}), not to {run}: "
                             f"delete it to start afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        shuffle.set_state(state["shuffle"].cpu())
        _set_rng_state(state["rng"], device)
        losses, start, sessions = state["losses"], state["epoch"], state.get("sessions", [])
        log(f"{path.name}: resuming after epoch {start}/{cfg.epochs}")
    step_model = torch.compile(model) if compile else model
    n, bs, name = len(inputs), cfg.batch_size, f"{path.stem} (seed {seed})"
    session = _session_clock(start, device)

    def save_resume_state(epoch):
        save_checkpoint(resume_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "shuffle": shuffle.get_state(), "rng": _rng_state(device), "losses": losses,
                                      "epoch": epoch, "run": run, "sessions": sessions + [session(epoch)]})

    bar = tqdm(total=cfg.epochs, initial=start, desc=path.stem, disable=not progress, leave=False)

    def train_epoch(out_of_time):
        model.train()
        order = torch.randperm(n, generator=shuffle).to(device)
        total = torch.zeros((), device=device)  # summed on the device: one host sync per epoch
        for first in range(0, n, bs):
            if out_of_time():
                return False
            batch = order[first:first + bs]
            total += train_step(step_model, optimizer, inputs[batch], targets[batch])
        losses.append((total / -(-n // bs)).item())
        message = f"Epoch {len(losses)}/{cfg.epochs}, Loss: {losses[-1]:.4f}"
        bar.update()
        bar.set_postfix_str(f"loss {losses[-1]:.4f}")
        log(message if progress else f"{name}: {message}")
        return True

    finished = _epochs(cfg, start, train_epoch, save_resume_state, deadline, save_every, log, name)
    bar.close()
    if not finished:
        return None
    return _save_finished(path, model.state_dict(), model.config, run, losses, sessions + [session(cfg.epochs)], tf32)


def _session_clock(start, device, **extra):
    """A function epoch -> this training session's facts (device, threads, seconds so far) when it reaches `epoch`;
    kept in resume states and checkpoints, since CPU results depend on the thread count."""
    began = time.perf_counter()
    facts = dict(first_epoch=start + 1, device=str(device), hardware=hardware_name(device),
                 threads=torch.get_num_threads(), torch_version=str(torch.__version__), **extra)
    return lambda epoch: dict(facts, last_epoch=epoch, seconds=round(time.perf_counter() - began, 1))


def _epochs(cfg, start, train_epoch, save_resume_state, deadline, save_every, log, name):
    """The epoch loop of a cell and of a group: epochs start + 1 .. cfg.epochs under the deadline (a time.time());
    returns True when the last one is trained.

    train_epoch(out_of_time) trains, records and logs one epoch, or returns False when out_of_time() (asked before
    each step) stopped it part way. Only a session's first epoch asks the deadline, since it has no measured length to
    plan with; a cut epoch is dropped. After an epoch, training stops when the next one would end after the deadline.
    save_resume_state(epochs) runs every save_every epochs, and on stopping when this session trained."""
    done = start
    for epoch in range(start, cfg.epochs):
        epoch_began = time.time()
        if deadline is not None and epoch_began >= deadline:
            break
        watch = epoch == start and deadline is not None
        if not train_epoch(lambda: watch and time.time() >= deadline):
            log(f"{name}: time budget reached during epoch {epoch + 1}/{cfg.epochs}, which is dropped")
            break
        done = epoch + 1
        if done == cfg.epochs:
            break
        if deadline is not None and time.time() + 1.2 * (time.time() - epoch_began) > deadline:
            log(f"{name}: time budget reached after epoch {done}/{cfg.epochs}; resume state saved")
            break
        if save_every and done % save_every == 0:
            save_resume_state(done)
    if start < done < cfg.epochs:  # stopped by the deadline after training in this session: keep the progress
        save_resume_state(done)
    return done == cfg.epochs


def _save_finished(path, state_dict, model_config, run, losses, sessions, tf32, **extra):
    """A finished cell's checkpoint (weights, model config, training facts), written atomically; its resume state
    deleted. Returns the path."""
    facts = dict(task=run["task"], epochs=len(losses), seed=run["seed"],
                 cell_seed=cell_seed(run["seed"], run["heads"], run["task"]), final_loss=losses[-1] if losses else None,
                 losses=losses, torch_version=str(torch.__version__), device=sessions[-1]["device"],
                 hardware=sessions[-1]["hardware"], threads=sessions[-1]["threads"], tf32=tf32,
                 train_seconds=round(sum(s["seconds"] for s in sessions), 1), sessions=sessions,
                 hyperparameters=run["hyperparameters"], **extra)
    state = {k: v.detach().cpu() for k, v in state_dict.items()}  # loadable on any machine, GPU or not
    save_checkpoint(path, {"format": FORMAT, "state_dict": state, "config": model_config, "training": facts})
    resume_path_of(path).unlink(missing_ok=True)
    return path


def group_loss(model):
    """A function (stacked params, stacked buffers, inputs (M, B, T), targets (M, B, T)) -> the M cells' mean
    cross-entropies, one vmapped forward over M stacked copies of `model`'s architecture. It takes the explicit
    attention path (PyTorch's fused attention has no vmap rule for its backward), and dropout draws another mask for
    every cell (randomness="different") from torch's default generator."""
    base = copy.deepcopy(model).to("meta").train()

    def cell_loss(params, buffers, inputs, targets):
        logits, _ = functional_call(base, (params, buffers), (inputs,), {"return_attn": True})
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return vmap(cell_loss, randomness="different")


def _stack_optimizer_state(states):
    """One Adam state over stacked parameters from the cells' own (the inverse of _cell_optimizer_state)."""
    return {"state": {i: {k: v if k == "step" else torch.stack([s["state"][i][k] for s in states])
                          for k, v in entry.items()} for i, entry in states[0]["state"].items()},
            "param_groups": states[0]["param_groups"]}


def _cell_optimizer_state(state, m):
    """Cell m's Adam state, as a one-cell optimizer over its own parameters would hold it."""
    return {"state": {i: {k: v if k == "step" else v[m] for k, v in entry.items()}
                      for i, entry in state["state"].items()}, "param_groups": state["param_groups"]}


def train_group(cfg, cells, device="cpu", resume=False, save_every=10, tf32=False, log=print, deadline=None):
    """Train cells of one head count together, in one process, all cells in every step.

    A cell stays a cell: its initialisation from its cell seed, its own data and shuffling generator, its own Adam
    moments (one Adam over the stacked weights is elementwise), its own resume state and checkpoint in train_cell's
    formats. Their weights are stacked, and one vmapped forward and backward (group_loss) and one Adam step serve
    them all. Dropout masks come from the group's own generator (seeded from its cells), a different mask for every
    cell: a cell's masks depend on its group and differ from a single-cell run's, and a group resumes only as the same
    group. cells: dicts of heads, task, seed and ckpt_dir. Returns the checkpoint paths, None for cells the deadline
    stopped (their resume states saved)."""
    device = torch.device(device)
    if len({c["heads"] for c in cells}) != 1:
        raise ValueError(f"a group trains one head count, got {sorted({c['heads'] for c in cells})}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    paths = [checkpoint_path(c["ckpt_dir"], c["heads"], c["task"]) for c in cells]
    resume_paths = [resume_path_of(path) for path in paths]
    group = [f"seed {c['seed']}, {c['heads']} heads, {c['task']}" for c in cells]
    names = [f"{path.stem} (seed {c['seed']})" for path, c in zip(paths, cells)]
    runs = [dict(heads=c["heads"], task=c["task"], seed=c["seed"], hyperparameters=dataclasses.asdict(cfg))
            for c in cells]
    data = [make_dataset(c["task"], cfg.num_sequences, cfg.seq_length, cfg.vocab_size, c["seed"]) for c in cells]
    inputs, targets = (torch.stack([getattr(d, name) for d in data]).to(device) for name in ("inputs", "targets"))
    models = []
    for c in cells:
        torch.manual_seed(cell_seed(c["seed"], c["heads"], c["task"]))  # each cell's own initialisation
        models.append(build_model(cfg, c["heads"]).to(device))
    shuffles = [torch.Generator().manual_seed(cell_seed(c["seed"], c["heads"], c["task"])) for c in cells]
    torch.manual_seed(zlib.crc32("; ".join(group).encode()))  # the group's dropout stream
    params, buffers = stack_module_state(models)
    optimizer = make_optimizer(params.values(), cfg, device)
    losses, start, sessions = [[] for _ in cells], 0, [[] for _ in cells]
    present = [path.is_file() for path in resume_paths]
    if resume and any(present):
        if not all(present):
            raise ValueError(f"a group resumes whole: resume states found for {sum(present)} of its {len(cells)} "
                             f"cells ({', '.join(str(p) for p, ok in zip(resume_paths, present) if not ok)} missing)")
        states = [_read(path, device) for path in resume_paths]
        for path, state, run in zip(resume_paths, states, runs):
            if state.get("run") != run or state.get("group") != group or state["epoch"] != states[0]["epoch"]:
                raise ValueError(f"{path} belongs to another run or group ({state.get('run')}, {state.get('group')}, "
                                 f"epoch {state['epoch']}), not to {run} in {group}: delete the group's resume states "
                                 f"to start afresh")
        with torch.no_grad():
            for name, value in params.items():
                value.copy_(torch.stack([state["model"][name] for state in states]))
        optimizer.load_state_dict(_stack_optimizer_state([state["optimizer"] for state in states]))
        for shuffle, state in zip(shuffles, states):
            shuffle.set_state(state["shuffle"].cpu())
        _set_rng_state(states[0]["rng"], device)
        losses, start = [state["losses"] for state in states], states[0]["epoch"]
        sessions = [state.get("sessions", []) for state in states]
        log(f"group of {len(cells)} ({group[0]}, ...): resuming after epoch {start}/{cfg.epochs}")
    loss_of = group_loss(models[0])
    n, bs, cell = len(data[0]), cfg.batch_size, torch.arange(len(cells), device=device)[:, None]
    session = _session_clock(start, device, group=len(cells))

    def save_resume_states(epoch):
        optimizer_state = optimizer.state_dict()
        for m, path in enumerate(resume_paths):
            save_checkpoint(path, {"model": {k: v[m].detach() for k, v in params.items()},
                                   "optimizer": _cell_optimizer_state(optimizer_state, m),
                                   "shuffle": shuffles[m].get_state(), "rng": _rng_state(device),
                                   "losses": losses[m], "epoch": epoch, "run": runs[m], "group": group,
                                   "sessions": sessions[m] + [session(epoch)]})

    def train_epoch(out_of_time):
        order = torch.stack([torch.randperm(n, generator=shuffle) for shuffle in shuffles]).to(device)
        total = torch.zeros(len(cells), device=device)
        for first in range(0, n, bs):
            if out_of_time():
                return False
            batch = order[:, first:first + bs]
            loss = loss_of(params, buffers, inputs[cell, batch], targets[cell, batch])
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()  # each cell's weights get the gradient of its own loss
            optimizer.step()
            total += loss.detach()
        for m, value in enumerate((total / -(-n // bs)).tolist()):
            losses[m].append(value)
            log(f"{names[m]}: Epoch {len(losses[m])}/{cfg.epochs}, Loss: {value:.4f}")
        return True

    if not _epochs(cfg, start, train_epoch, save_resume_states, deadline, save_every, log, f"group of {len(cells)}"):
        return [None] * len(cells)
    return [_save_finished(path, {k: v[m] for k, v in params.items()}, models[m].config, runs[m], losses[m],
                           sessions[m] + [session(cfg.epochs)], tf32, group=group) for m, path in enumerate(paths)]


def timing_step(cfg, heads, device, explicit_attention=False):
    """One training step of a fresh model on a random batch, as a callable returning the loss: for timing."""
    model = build_model(cfg, heads).to(device).train()
    optimizer = make_optimizer(model.parameters(), cfg, device)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_length), device=device)
    return lambda: train_step(model, optimizer, x, x, explicit_attention=explicit_attention)


def group_timing_step(cfg, heads, cells, device):
    """One grouped training step (train_group's) of `cells` fresh stacked models on random batches, as a callable
    returning the cells' losses: for timing."""
    models = [build_model(cfg, heads).to(device) for _ in range(cells)]
    params, buffers = stack_module_state(models)
    optimizer = make_optimizer(params.values(), cfg, device)
    loss_of = group_loss(models[0])
    x = torch.randint(0, cfg.vocab_size, (cells, cfg.batch_size, cfg.seq_length), device=device)

    def step():
        loss = loss_of(params, buffers, x, x)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        return loss.detach()
    return step


def steps_per_epoch(cfg):
    """Training steps in one epoch: the config's sequences in batches, the last one possibly short."""
    return -(-cfg.num_sequences // cfg.batch_size)


def seconds_per_step(cfg, heads, device, threads=1, steps=3):
    """Measured seconds of one training step of a fresh model on `threads` threads (median of `steps`, after a
    warm-up step)."""
    with intra_op_threads(threads):
        step, times = timing_step(cfg, heads, device), []
        for _ in range(steps + 1):
            began = time.perf_counter()
            step().item()  # .item(): wait for the device
            times.append(time.perf_counter() - began)
        return sorted(times[1:])[len(times[1:]) // 2]


def estimated_training_seconds(cfg, heads_of_cells, jobs, step_seconds):
    """Wall time of training cells of these head counts, `jobs` at a time in the given order (each starts on the
    first free worker), from the seconds per step of each head count."""
    steps = cfg.epochs * steps_per_epoch(cfg)
    workers = [0.0] * max(1, min(jobs, len(heads_of_cells)))
    for heads in heads_of_cells:
        workers[workers.index(min(workers))] += steps * step_seconds[heads]
    return max(workers)


def _exit_with(parent, poll_seconds=1.0):
    """Exit this worker process once `parent` has died (it is then re-parented): a killed train.py must not leave
    workers training on, and writing checkpoints, behind it. Writes are atomic, so nothing is left half written."""
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    os._exit(1)


def _train_cell_in_worker(kwargs):
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    return train_cell(**kwargs, progress=False)


def train_cells(cells, jobs=None, threads=None, group=False, **kwargs):
    """Train the cells: in groups (train_group, one per head count, in this process) when `group` is true, else
    `jobs` worker processes at once (None: one per CPU core), each cell on `threads` intra-op threads
    (None: default_threads). CPU arithmetic depends on the thread count, not on `jobs`: with `threads` given, a cell's
    checkpoint does not depend on the scheduling.
    A cell is a (heads, task) pair or a dict of train_cell arguments that override kwargs. Returns the checkpoint
    paths, None for cells stopped by the deadline."""
    cells = [cell if isinstance(cell, dict) else dict(heads=cell[0], task=cell[1]) for cell in cells]
    if group:
        with intra_op_threads(threads):
            return _train_in_groups(cells, **kwargs)
    jobs = default_jobs(jobs, cells)
    threads = default_threads(threads, min(jobs, len(cells)))
    if jobs <= 1 or len(cells) <= 1:
        return [train_cell(**dict(kwargs, threads=threads, **cell)) for cell in cells]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_train_cell_in_worker, dict(kwargs, threads=threads, **cell)) for cell in cells]
        return [f.result() for f in futures]


def _train_in_groups(cells, cfg, seed=SEED, device="cpu", ckpt_dir=CKPT_DIR, resume=False, save_every=10,
                      tf32=False, compile=False, progress=True, log=print, deadline=None):
    """train_group for the cells of each head count (finished ones skipped with resume); paths in the cells' order.
    compile and progress bars are per-cell features: a group logs its epochs instead."""
    cells = [dict(dict(seed=seed, ckpt_dir=ckpt_dir), **cell) for cell in cells]
    paths = [checkpoint_path(c["ckpt_dir"], c["heads"], c["task"]) for c in cells]
    done = [resume and path.is_file() for path in paths]
    for path in (path for path, finished in zip(paths, done) if finished):
        log(f"{path.stem}: already trained ({path}), skipped")
    results = dict(zip(map(id, cells), (path if finished else None for path, finished in zip(paths, done))))
    for heads in dict.fromkeys(c["heads"] for c, finished in zip(cells, done) if not finished):
        todo = [c for c, finished in zip(cells, done) if not finished and c["heads"] == heads]
        log(f"training a group of {len(todo)} cells of {heads} heads on {device}")
        results.update(zip(map(id, todo), train_group(cfg, todo, device, resume, save_every, tf32, log, deadline)))
    return [results[id(c)] for c in cells]


def warn_of_long_training(cfg, heads_of_cells, jobs, threads, device, longer_than=300):
    """Print the estimated wall time, measured from a few steps, and the ways around it, when it is long."""
    step_seconds = {h: seconds_per_step(cfg, h, device, threads) for h in sorted(set(heads_of_cells))}
    estimate = estimated_training_seconds(cfg, heads_of_cells, jobs, step_seconds)
    if estimate > longer_than:
        print(f"estimated training time on this CPU: {estimate / 3600:.1f} h ({jobs} cell(s) at a time; measured "
              f"from a few steps: " + ", ".join(f"{h} heads {1000 * t:.0f} ms/step" for h, t in step_seconds.items())
              + "). Ways around it: --official evaluates the authors' released models in seconds; --quick runs a "
              "tiny configuration; a CUDA GPU (--device cuda) trains all 8 paper cells in about 7 minutes; "
              "--time-budget MINUTES stops with resume states. Ctrl-C now to choose.", flush=True)


def load_model(cfg, heads, path, device):
    """A model of the config's architecture with the checkpoint's weights, in eval mode, and its training facts."""
    model = build_model(cfg, heads).to(device)
    facts = load_checkpoint(model, path, device)
    return model.eval(), facts


def ensure_models(cfg, cells, seed, device, ckpt_dir, retrain=False, jobs=None, threads=None, deadline=None,
                  group=False):
    """Load every (heads, task) cell's checkpoint, training those missing (or all, with retrain) first. The
    checkpoints that exist are read and checked before any training starts: a bad one fails in seconds, not hours."""
    todo = [(h, t) for h, t in cells if retrain or not checkpoint_path(ckpt_dir, h, t).is_file()]
    models = {cell: load_model(cfg, cell[0], checkpoint_path(ckpt_dir, *cell), device) for cell in cells
              if cell not in todo}
    if todo:
        jobs = default_jobs(jobs, todo)
        threads = default_threads(threads, min(jobs, len(todo)))
        print(f"training {len(todo)} cell(s) on {device} ({cfg.epochs} epochs each, {jobs} at a time): "
              + ", ".join(f"{h}_heads_{t}" for h, t in todo))
        if device.type == "cpu":
            warn_of_long_training(cfg, [h for h, _ in todo], jobs, threads, device)
        # resume=True: a cell interrupted earlier continues from its last saved epoch (its run facts are checked)
        paths = train_cells(todo, jobs, threads, group, cfg=cfg, seed=seed, device=device, ckpt_dir=ckpt_dir,
                            resume=not retrain, log=tqdm.write, deadline=deadline)
        unfinished = [f"{h}_heads_{t}" for (h, t), path in zip(todo, paths) if path is None]
        if unfinished:
            raise SystemExit(f"time budget reached: {', '.join(unfinished)} unfinished, resume states saved in "
                             f"{ckpt_dir}; run the same command again to continue")
    for h, t in cells:
        path = checkpoint_path(ckpt_dir, h, t)
        if (h, t) in todo:
            models[h, t] = load_model(cfg, h, path, device)
        facts = models[h, t][1]
        print(f"loaded {path}: " + (f"{facts['epochs']} epochs on {facts['device']}, seed {facts['seed']}, "
                                    f"final loss {facts['final_loss']:.4f}" if "epochs" in facts else facts["source"]))
    return {cell: models[cell] for cell in cells}


def load_runs(cfg, cells, runs, device, log=print):
    """Each run's models among `cells` (a list of (heads, task)), every checkpoint read and checked; nothing is
    trained, and the missing cells are named. Returns [(run, {(heads, task): model})] for runs with any cell."""
    loaded, missing = [], []
    for run in runs:
        models = {}
        for heads, task in cells:
            path = checkpoint_path(run.folder, heads, task)
            if path.is_file():
                models[heads, task] = load_model(cfg, heads, path, device)[0]
            else:
                unfinished = resume_path_of(path).is_file()
                missing.append(f"{path}{' (unfinished: resume state present)' if unfinished else ''}")
        if models:
            loaded.append((run, models))
    complete = [run.name for run, models in loaded if len(models) == len(cells)]
    log(f"runs: {len(loaded)} with checkpoints ({', '.join(run.name for run, _ in loaded) or 'none'}), complete: "
        f"{', '.join(complete) or 'none'}" + (f"; {len(missing)} cell(s) missing, left out: " + "; ".join(missing)
                                               if missing else ""))
    return loaded


def training_status(cfg, cells, device_type, jobs):
    """Where the training of `cells` (dicts of heads, task, seed and ckpt_dir) stands, read from their files.

    Returns one row per cell (finished, stopped after epoch k, or not started; the hours it took and on what), a
    summary line, and the cell-hours left: each unfinished cell's epochs times the seconds per epoch that these
    cells' own sessions on `device_type` took at its head count (a grouped session's time shared among its cells;
    nan where no session measured that head count)."""
    rows, spent = [], {}
    for c in cells:
        path = checkpoint_path(c["ckpt_dir"], c["heads"], c["task"])
        resume_path = resume_path_of(path)
        if path.is_file():
            facts = _read(path, "cpu").get("training", {})
            epochs, sessions, state = facts.get("epochs", cfg.epochs), facts.get("sessions", []), "finished"
        elif resume_path.is_file():
            resumed = _read(resume_path, "cpu")
            epochs, sessions = resumed["epoch"], resumed.get("sessions", [])
            state = f"epoch {epochs}/{cfg.epochs}"
        else:
            epochs, sessions, state = 0, [], "not started"
        cell_seconds = [s["seconds"] / s.get("group", 1) for s in sessions]
        for s, seconds in zip(sessions, cell_seconds):
            if torch.device(s["device"]).type == device_type:
                total = spent.setdefault(c["heads"], [0.0, 0])
                total[0] += seconds
                total[1] += s["last_epoch"] - s["first_epoch"] + 1
        rows.append(dict(seed=c["seed"], heads=c["heads"], task=c["task"], state=state, epochs=epochs,
                         hours=round(sum(cell_seconds) / 3600, 2),
                         on=", ".join(dict.fromkeys(f"{s['hardware']} ({s['device']}"
                                                    + (f", {s['threads']} thread(s))" if s["device"] == "cpu" else ")")
                                                    for s in sessions))))
    per_epoch = {h: seconds / epochs for h, (seconds, epochs) in sorted(spent.items()) if epochs}
    left = [r for r in rows if r["state"] != "finished"]
    hours_left = sum((cfg.epochs - r["epochs"]) * per_epoch.get(r["heads"], float("nan")) for r in left) / 3600
    summary = (f"{len(rows) - len(left)} of {len(rows)} cells finished, {sum(r['epochs'] > 0 for r in left)} "
               f"unfinished, {sum(r['epochs'] == 0 for r in left)} not started; "
               f"{sum(r['hours'] for r in rows):.1f} cell-hours spent. ")
    if not left:
        summary += "Nothing left."
    else:
        summary += (f"Left: about {hours_left:.1f} cell-hours on {device_type}, {hours_left / jobs:.1f} h with {jobs} "
                    f"at a time, at the seconds per epoch these cells took on {device_type} ("
                    + (", ".join(f"{h} heads {t:.1f} s" for h, t in per_epoch.items()) or "none measured") + ")")
    return rows, summary, hours_left


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, nargs="+", default=list(HEADS),
                        help="numbers of attention heads (default: the paper's 1 4 8 16)")
    parser.add_argument("--task", nargs="+", choices=TASKS, default=list(TASKS), help="default: both tasks")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train every cell for each of these seeds, into CKPT_DIR/seeds/seed_S (overrides --seed)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default {PAPER.epochs} ({QUICK.epochs} with --quick)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last saved epoch")
    parser.add_argument("--save-every", type=int, default=10, help="epochs between resume states (0: never)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (the paper is float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--status", action="store_true",
                        help="print where the training of these cells stands (finished, epochs of unfinished ones, "
                             "hours spent and left) and exit; trains nothing")
    add_training_args(parser)
    add_common_args(parser)
    args = parser.parse_args()
    cfg, device, ckpt_dir, _ = resolve_common(parser, args)
    if args.seeds is None:
        grid = [dict(heads=h, task=t) for t in args.task for h in args.heads]
    else:
        grid = [dict(heads=h, task=t, seed=s, ckpt_dir=ckpt_dir / "seeds" / f"seed_{s}")
                for s in args.seeds for t in args.task for h in args.heads]
    if args.status:
        cells = [dict(dict(seed=args.seed, ckpt_dir=ckpt_dir), **cell) for cell in grid]
        rows, summary, _ = training_status(cfg, cells, device.type, default_jobs(args.jobs, cells))
        print(tabulate(rows, headers="keys", tablefmt="github"), summary, sep="\n\n")
        return
    paths = train_cells(grid, args.jobs, args.threads, args.group, cfg=cfg, seed=args.seed, device=device,
                        ckpt_dir=ckpt_dir, resume=args.resume, save_every=args.save_every, tf32=args.tf32,
                        compile=args.compile, log=tqdm.write, deadline=deadline_of(args.time_budget))
    for cell, path in zip(grid, paths):
        print(f"wrote {path}" if path else f"unfinished (time budget): {cell['heads']} heads {cell['task']}"
              + (f" seed {cell['seed']}" if "seed" in cell else "") + " -- rerun with --resume to continue")


if __name__ == "__main__":
    main()
