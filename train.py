"""Train the cells of Section 4 (a head count and a task each) and save their checkpoints.

    python train.py --heads 4 --task copy [--epochs 200] [--device auto] [--seed 42] [--resume] [--quick]
    python train.py [--heads 1 4 8 16] [--task copy cycle] [--seeds 0 1 2 3 4] [--jobs 8] [--time-budget 6]
    python train.py --seeds 0 1 2 3 4 --status    # what is trained, what is left and the hours it will take

writes checkpoints/4_heads_copy.pt (checkpoints/quick/ with --quick); with --seeds, checkpoints/seeds/seed_S/.
The task's data depends only on (seed, task); initialisation, dropout and shuffling are seeded from
(seed, heads, task). A cell's CPU arithmetic depends on its intra-op thread count (--threads; default: the cores
shared among the cells that train at once; recorded in the checkpoint): with the same --threads a cell gives the same
model whether it is trained alone, in any order, or in parallel with others.
--time-budget stops training before the budget runs out, each unfinished cell saving its resume state.

Read top to bottom: `train_here` is the training loop (init or resume, epochs, batches, log, resume state, deadline,
checkpoint) of one cell, or of a group of cells of one head count that share one vmapped step (--group yes);
learners.py's `OneCell` and `Group` are the two ways a step is taken. Below it: resume states, the grid (worker
processes and their watchdog), where the evaluation scripts get their models (`models_of`, `trained_runs`: the
missing cells trained first), time estimates, and --status.
"""
import argparse
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from tabulate import tabulate
from tqdm import tqdm

from checkpoints import Cell, load_model, read_checkpoint, run_difference, save_checkpoint, save_trained, seed_folder
from config import HEADS, TASKS
from learners import Group, OneCell, timing_step
from runs import load_runs, training_status
from script_io import (add_common_args, add_training_args, deadline_of, hardware_name, input_errors,
                       intra_op_threads, resolve_training)


def train_here(cfg, cells, *, group=False, device="cpu", resume=False, save_every=10, tf32=False, compile=False,
               progress=True, log=print, deadline=None):
    """The training loop: train `cells` in this process and write their checkpoints atomically. One cell (a list of
    one), or with group the cells of one head count, all in every step. With resume, continue from the cells' resume
    states (a group resumes whole, and only as the same group).

    deadline: a time.time() by which training stops: when the next epoch would end after it, the resume states are
    saved and Nones returned instead of the checkpoint paths; a session's first epoch, which has no measured length
    to plan with, is dropped (nothing saved) if the deadline passes during it."""
    device = torch.device(device)
    if device.type == "cuda":  # the paper is float32: TF32 only on request
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    learner = Group(cfg, cells, device) if group else OneCell(cfg, cells[0], device, compile)
    name = f"group of {len(cells)}" if group else cells[0].name
    losses, start, sessions = resume_states(cfg, cells, learner, device, log) if resume else (
        [[] for _ in cells], 0, [[] for _ in cells])
    clock = session_clock(start, device, **({"group": len(cells)} if group else {}))
    bar = tqdm(total=cfg.epochs, initial=start, desc=cells[0].path.stem, disable=group or not progress, leave=False)
    done = start
    for epoch in range(start, cfg.epochs):
        epoch_began = time.time()
        if deadline is not None and epoch_began >= deadline:
            break
        epoch_losses = train_epoch(cfg, learner, device, deadline=deadline if epoch == start else None)
        if epoch_losses is None:
            log(f"{name}: time budget reached during epoch {epoch + 1}/{cfg.epochs}, which is dropped")
            break
        for cell, cell_losses, value in zip(cells, losses, epoch_losses):
            cell_losses.append(value)
            prefix = "" if progress and not group else f"{cell.name}: "  # a progress bar names the cell itself
            log(f"{prefix}Epoch {epoch + 1}/{cfg.epochs}, Loss: {value:.4f}")
        bar.update()
        bar.set_postfix_str(f"loss {epoch_losses[0]:.4f}")
        done = epoch + 1
        if done == cfg.epochs:
            break
        if deadline is not None and time.time() + 1.2 * (time.time() - epoch_began) > deadline:
            log(f"{name}: time budget reached after epoch {done}/{cfg.epochs}; resume state saved")
            break
        if save_every and done % save_every == 0:
            save_resume_states(cfg, cells, learner, device, losses=losses, sessions=sessions, session=clock(done))
    bar.close()
    if start < done < cfg.epochs:  # stopped by the deadline after training in this session: keep the progress
        save_resume_states(cfg, cells, learner, device, losses=losses, sessions=sessions, session=clock(done))
    if done < cfg.epochs:
        return [None] * len(cells)
    extra = {"group": learner.label} if group else {}
    return [save_trained(cell, cfg, state_dict=weights, model_config=learner.config, losses=cell_losses,
                         sessions=cell_sessions + [clock(cfg.epochs)], tf32=tf32, **extra)
            for cell, (weights, _), cell_losses, cell_sessions in zip(cells, learner.cell_states(), losses, sessions)]


def train_epoch(cfg, learner, device, deadline=None):
    """One epoch of every cell of `learner`: each shuffled by its own generator, in batches; the cells' mean losses,
    or None when `deadline` (asked before each step) passed part way."""
    order = torch.stack([torch.randperm(cfg.num_sequences, generator=g) for g in learner.shuffles]).to(device)
    total = torch.zeros(len(learner.shuffles), device=device)  # summed on the device: one host sync per epoch
    for first in range(0, cfg.num_sequences, cfg.batch_size):
        if deadline is not None and time.time() >= deadline:
            return None
        total += learner.step(order[:, first:first + cfg.batch_size])
    return (total / steps_per_epoch(cfg)).tolist()


def steps_per_epoch(cfg):
    """Training steps in one epoch: the config's sequences in batches, the last one possibly short."""
    return -(-cfg.num_sequences // cfg.batch_size)


def _rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def session_clock(start, device, **extra):
    """A function epoch -> this training session's facts (device, threads, seconds so far) when it reaches `epoch`;
    kept in resume states and checkpoints, since CPU results depend on the thread count."""
    began = time.perf_counter()
    facts = dict(first_epoch=start + 1, device=str(device), hardware=hardware_name(device),
                 threads=torch.get_num_threads(), torch_version=str(torch.__version__), **extra)
    return lambda epoch: dict(facts, last_epoch=epoch, seconds=round(time.perf_counter() - began, 1))


def resume_states(cfg, cells, learner, device, log):
    """The cells' resume states loaded into `learner`, their generators and torch's: (losses, epoch, sessions), or a
    fresh start when there are none. Refused: states of some cells only, or of another run, group or epoch."""
    present = [cell.resume_path.is_file() for cell in cells]
    if not any(present):
        return [[] for _ in cells], 0, [[] for _ in cells]
    if not all(present):
        raise ValueError(f"a group resumes whole: resume states found for {sum(present)} of its {len(cells)} cells "
                         f"({', '.join(str(c.resume_path) for c, ok in zip(cells, present) if not ok)} missing)")
    states = [read_checkpoint(cell.resume_path, device) for cell in cells]
    group = learner.label
    for cell, state in zip(cells, states):
        difference = run_difference(state.get("run"), cell.run_facts(cfg))
        if difference is None and state.get("group") != group:
            difference = f"group: {state.get('group')} in the file, {group} now"
        if difference is None and state["epoch"] != states[0]["epoch"]:
            difference = f"epoch: {state['epoch']} in the file, {states[0]['epoch']} in {cells[0].resume_path}"
        if difference:
            raise ValueError(f"{cell.resume_path} belongs to another run or group ({difference}): delete "
                             f"{'the group' if group else 'its'} resume state(s) to start afresh")
    learner.load(states)
    for shuffle, state in zip(learner.shuffles, states):
        shuffle.set_state(state["shuffle"].cpu())
    _set_rng_state(states[0]["rng"], device)
    start = states[0]["epoch"]
    log(f"{cells[0].path.name if group is None else f'group of {len(cells)} ({group[0]}, ...)'}: resuming after "
        f"epoch {start}/{cfg.epochs}")
    return [state["losses"] for state in states], start, [state.get("sessions", []) for state in states]


def save_resume_states(cfg, cells, learner, device, *, losses, sessions, session):
    """Each cell's resume state: weights, Adam state, generators, losses, epoch, run facts and sessions so far."""
    group = {"group": learner.label} if learner.label else {}
    rng = _rng_state(device)  # torch's generators: the same for every cell of a group
    for m, (cell, (weights, optimizer_state)) in enumerate(zip(cells, learner.cell_states())):
        save_checkpoint(cell.resume_path, {"model": weights, "optimizer": optimizer_state,
                                           "shuffle": learner.shuffles[m].get_state(), "rng": rng,
                                           "losses": losses[m], "epoch": session["last_epoch"],
                                           "run": cell.run_facts(cfg), "sessions": sessions[m] + [session], **group})


# The grid: cells in worker processes, or in groups
def default_jobs(jobs, cells):
    """--jobs as given, else one worker per CPU core, at most one per cell."""
    return jobs or min(len(cells), os.cpu_count() or 1)


def default_threads(threads, cells_at_once):
    """--threads as given, else the CPU's cores shared among the cells that train at once (at least 1 each)."""
    return threads or max(1, (os.cpu_count() or 1) // cells_at_once)


def train_cell(cfg, cell, *, threads=None, **options):
    """Train one Cell in this process on `threads` intra-op threads (None: torch's setting); options: train_here's.
    Returns its checkpoint path, None when the deadline stopped it."""
    with intra_op_threads(threads):
        return train_here(cfg, [cell], **options)[0]


def _exit_with(parent, poll_seconds=1.0):
    """Exit this worker process once `parent` has died (it is then re-parented): a killed train.py must not leave
    workers training on, and writing checkpoints, behind it. Writes are atomic, so nothing is left half written."""
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    os._exit(1)


def _train_cell_in_worker(cfg, cell, options):
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    return train_cell(cfg, cell, **options, progress=False)


def train_cells(cfg, cells, *, jobs=None, threads=None, group=False, resume=False, log=print, **options):
    """Train the Cells: with resume, finished ones are skipped (a resume state beside one is stale) and the others
    continue. One cell per worker process, `jobs` at a time (None: one per CPU core), each on `threads` intra-op
    threads (None: default_threads); or with group, the cells of each head count together in this process. CPU
    arithmetic depends on the thread count, not on `jobs`: with `threads` given, a cell's checkpoint does not depend
    on the scheduling. options: train_here's. Returns the checkpoint paths, None for cells the deadline stopped."""
    paths = {cell: cell.path for cell in cells if resume and cell.path.is_file()}
    for path in paths.values():
        log(f"{path.stem}: already trained ({path}), skipped")
    todo = [cell for cell in cells if cell not in paths]
    options = dict(options, resume=resume, log=log)
    if group:
        with intra_op_threads(threads):
            for heads in dict.fromkeys(cell.heads for cell in todo):
                part = [cell for cell in todo if cell.heads == heads]
                log(f"training a group of {len(part)} cells of {heads} heads on {options.get('device', 'cpu')}")
                paths.update(zip(part, train_here(cfg, part, group=True, **options)))
        return [paths[cell] for cell in cells]
    jobs = default_jobs(jobs, cells)
    threads = default_threads(threads, min(jobs, len(cells)))
    if jobs <= 1 or len(todo) <= 1:
        paths.update((cell, train_cell(cfg, cell, threads=threads, **options)) for cell in todo)
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {cell: pool.submit(_train_cell_in_worker, cfg, cell, dict(options, threads=threads))
                       for cell in todo}
            paths.update((cell, future.result()) for cell, future in futures.items())
    return [paths[cell] for cell in cells]


# What the evaluation scripts call: their models, the missing ones trained first
def ensure_models(cfg, cells, *, device, retrain=False, jobs=None, threads=None, deadline=None, group=False):
    """{cell: (model, training facts)} of every Cell, training those missing (or all, with retrain) first. The
    checkpoints that exist are read and checked before any training starts: a bad one fails in seconds, not hours."""
    todo = [cell for cell in cells if retrain or not cell.path.is_file()]
    models = {cell: load_model(cfg, cell.heads, cell.path, device) for cell in cells if cell not in todo}
    if todo:
        jobs = default_jobs(jobs, todo)
        threads = default_threads(threads, min(jobs, len(todo)))
        print(f"training {len(todo)} cell(s) on {device} ({cfg.epochs} epochs each, {jobs} at a time): "
              + ", ".join(cell.path.stem for cell in todo))
        if device.type == "cpu":
            warn_of_long_training(cfg, [cell.heads for cell in todo], jobs, threads, device)
        # resume (unless retrain): a cell interrupted earlier continues from its last saved epoch, its run checked
        paths = train_cells(cfg, todo, jobs=jobs, threads=threads, group=group, device=device, resume=not retrain,
                            log=tqdm.write, deadline=deadline)
        unfinished = [cell.path.stem for cell, path in zip(todo, paths) if path is None]
        if unfinished:
            raise SystemExit(f"time budget reached: {', '.join(unfinished)} unfinished, resume states saved in "
                             f"{todo[0].folder}; run the same command again to continue")
    for cell in cells:
        if cell in todo:
            models[cell] = load_model(cfg, cell.heads, cell.path, device)
        facts = models[cell][1]
        print(f"loaded {cell.path}: " + (f"{facts['epochs']} epochs on {facts['device']}, seed {facts['seed']}, "
                                         f"final loss {facts['final_loss']:.4f}" if "epochs" in facts
                                         else facts["source"]))
    return {cell: models[cell] for cell in cells}


def models_of(cfg, cells, args, device, ckpt_dir):
    """An evaluation script's models {(heads, task): model} of --seed in ckpt_dir, the missing ones (all with
    --retrain) trained first as its training flags say."""
    models = ensure_models(cfg, [Cell(heads, task, args.seed, ckpt_dir) for heads, task in cells], device=device,
                           retrain=args.retrain, jobs=args.jobs, threads=args.threads,
                           deadline=deadline_of(args.time_budget), group=args.group == "yes")
    return {(cell.heads, cell.task): model for cell, (model, _) in models.items()}


def trained_runs(cfg, cells, args, device, runs):
    """[(run, {(heads, task): model})] of runs (as runs.runs_of gives them): the first, --seed's, through models_of
    (its missing cells trained first); each other run that has any of the cells through runs.load_runs (read and
    checked, nothing trained)."""
    first, *others = runs
    return [(first, models_of(cfg, cells, args, device, first.folder))] + (load_runs(cfg, cells, others, device)
                                                                          if others else [])


# Time: steps timed, training estimated
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


def warn_of_long_training(cfg, heads_of_cells, jobs, threads, device, longer_than=300):
    """Print the estimated wall time, measured from a few steps, and the ways around it, when it is long."""
    step_seconds = {h: seconds_per_step(cfg, h, device, threads) for h in sorted(set(heads_of_cells))}
    estimate = estimated_training_seconds(cfg, heads_of_cells, jobs, step_seconds)
    if estimate > longer_than:
        print(f"estimated training time on this CPU: {estimate / 3600:.1f} h ({jobs} cell(s) at a time; measured "
              f"from a few steps: " + ", ".join(f"{h} heads {1000 * t:.0f} ms/step" for h, t in step_seconds.items())
              + "). Ways around it: --official evaluates the authors' released models in seconds; --quick runs a "
              "tiny configuration; a CUDA GPU (--device cuda) trains the 8 paper cells in minutes; "
              "--time-budget MINUTES stops with resume states. Ctrl-C now to choose.", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, nargs="+", default=list(HEADS),
                        help="numbers of attention heads (default: the paper's 1 4 8 16)")
    parser.add_argument("--tasks", "--task", nargs="+", choices=TASKS, default=list(TASKS),
                        help="default: both tasks (--task: the same, as earlier versions spelled it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train every cell for each of these seeds, into CKPT_DIR/seeds/seed_S (overrides --seed)")
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
    cfg, device, ckpt_dir = resolve_training(parser, args)
    runs = [(args.seed, ckpt_dir)] if args.seeds is None else [(s, seed_folder(ckpt_dir, s)) for s in args.seeds]
    grid = [Cell(h, t, seed, folder) for seed, folder in runs for t in args.tasks for h in args.heads]
    if args.status:
        rows, summary, _ = training_status(cfg, grid, device.type, default_jobs(args.jobs, grid))
        print(tabulate(rows, headers="keys", tablefmt="github"), summary, sep="\n\n")
        return
    with input_errors(parser):  # a resume state of another run: one line naming the setting, no traceback
        paths = train_cells(cfg, grid, jobs=args.jobs, threads=args.threads, group=args.group == "yes",
                            device=device, resume=args.resume, save_every=args.save_every, tf32=args.tf32,
                            compile=args.compile, log=tqdm.write, deadline=deadline_of(args.time_budget))
    for cell, path in zip(grid, paths):
        print(f"wrote {path}" if path else f"unfinished (time budget): {cell.heads} heads {cell.task} seed "
              f"{cell.seed} -- rerun with --resume to continue")


if __name__ == "__main__":
    main()
