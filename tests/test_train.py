"""Training is deterministic per cell, resumable, and the same in worker processes as in one process."""
import copy
import dataclasses
import io
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

import learners
import runs
import train
from checkpoints import Cell, build_model, cell_seed, load_checkpoint
from config import QUICK, Training, training_settings
from script_io import hardware_name, resolve_device
from train import estimated_training_seconds, seconds_per_step, train_cell, train_cells

CFG = dataclasses.replace(QUICK, epochs=3)
quiet = dict(progress=False, log=lambda *_: None)
quiet_group = dict(log=lambda *_: None)


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_checkpoint_and_facts_recorded(tmp_path):
    a = train_cell(CFG, Cell(4, "cycle", 7, folder=tmp_path / "a"), **quiet)
    b = train_cell(CFG, Cell(4, "cycle", 7, folder=tmp_path / "b"), **quiet)
    c = train_cell(CFG, Cell(4, "cycle", 8, folder=tmp_path / "c"), **quiet)
    assert same_weights(weights(a), weights(b)) and not same_weights(weights(a), weights(c))
    facts = torch.load(a, weights_only=True)["training"]
    assert facts["epochs"] == 3 and facts["seed"] == 7 and facts["task"] == "cycle" and len(facts["losses"]) == 3
    assert facts["device"] == "cpu" and facts["torch_version"] == str(torch.__version__)
    assert facts["final_loss"] == facts["losses"][-1] and facts["losses"][-1] < facts["losses"][0]
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.resume"))


def test_cell_seed_depends_on_every_part():
    seeds = {cell_seed(s, h, t) for s in (1, 2) for h in (1, 4) for t in ("copy", "cycle")}
    # pinned: a seed built on Python's hash() of a string would change from one process to the next
    assert len(seeds) == 8 and (cell_seed(42, 4, "copy"), cell_seed(0, 1, "cycle")) == (3679257077, 1713675021)


def interrupt_at(epoch):
    """A log function that stops training (as Ctrl-C would) when epoch `epoch` ends, before its state is saved."""
    def log(message):
        if message.startswith(f"Epoch {epoch}/"):
            raise KeyboardInterrupt
    return log


def interrupt_on(text):
    """A log function that stops training (as Ctrl-C would) at the first message containing `text`."""
    def log(message):
        if text in message:
            raise KeyboardInterrupt
    return log


def test_resume_gives_the_uninterrupted_model(tmp_path):
    full = train_cell(CFG, Cell(4, "copy", folder=tmp_path / "full"), **quiet)
    with pytest.raises(KeyboardInterrupt):
        train_cell(CFG, Cell(4, "copy", folder=tmp_path / "cut"), save_every=1, progress=True, log=interrupt_at(3))
    cut = tmp_path / "cut"
    assert (cut / "4_heads_copy.pt.resume").is_file() and not (cut / "4_heads_copy.pt").exists()
    messages = []
    resumed = train_cell(CFG, Cell(4, "copy", folder=tmp_path / "cut"), resume=True, progress=False,
                         log=messages.append)
    assert "resuming after epoch 2/3" in messages[0]
    assert same_weights(weights(full), weights(resumed))
    assert torch.load(full, weights_only=True)["training"]["losses"] == \
        torch.load(resumed, weights_only=True)["training"]["losses"]


def test_resume_refuses_another_runs_state(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train_cell(CFG, Cell(4, "copy", 1, folder=tmp_path), save_every=1, progress=True, log=interrupt_at(2))
    with pytest.raises(ValueError, match=r"belongs to another run or group \(seed: 1 in the file, 2 now\)"):
        train_cell(CFG, Cell(4, "copy", 2, folder=tmp_path), resume=True, **quiet)
    with pytest.raises(ValueError, match=r"\(lr: 0.001 in the file, 0.002 now\)"):
        train_cell(dataclasses.replace(CFG, lr=2e-3), Cell(4, "copy", 1, folder=tmp_path), resume=True, **quiet)


def test_an_evaluation_setting_keeps_resume_states_and_older_records_load(tmp_path):
    """A run is its training settings: a resume state stays valid when only evaluation settings change, and one
    written before the split (evaluation settings among its hyperparameters, a training setting missing) resumes."""
    full = train_cell(CFG, Cell(4, "copy", folder=tmp_path / "full"), **quiet)
    cut = Cell(4, "copy", folder=tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train_cell(CFG, cut, save_every=1, progress=True, log=interrupt_at(3))
    state = torch.load(cut.resume_path, weights_only=True)
    assert set(state["run"]["hyperparameters"]) == {f.name for f in dataclasses.fields(Training)}
    older = dict(state["run"]["hyperparameters"], amplification_draws=1068, horizon=100)
    del older["dropout"]
    torch.save(dict(state, run=dict(state["run"], hyperparameters=older)), cut.resume_path)
    evaluation_changed = dataclasses.replace(CFG, amplification_draws=7, horizon=3, eval_sequences=2)
    resumed = train_cell(evaluation_changed, cut, resume=True, **quiet)
    assert same_weights(weights(full), weights(resumed))
    assert torch.load(resumed, weights_only=True)["training"]["hyperparameters"] == training_settings(CFG)


def test_parallel_jobs_give_bit_identical_checkpoints(tmp_path):
    """Each cell trains on a fixed thread count whatever --jobs is, so scheduling cannot change its arithmetic."""
    cells = [(1, "copy"), (4, "cycle")]
    one = train_cells(CFG, [Cell(h, t, folder=tmp_path / "one") for h, t in cells], jobs=1, threads=1, **quiet)
    two = train_cells(CFG, [Cell(h, t, folder=tmp_path / "two") for h, t in cells], jobs=2, threads=1, log=print)
    for a, b in zip(one, two):
        assert same_weights(weights(a), weights(b))
        facts = torch.load(b, weights_only=True)["training"]
        assert facts["threads"] == 1 and facts["hardware"] and facts["sessions"][0]["threads"] == 1
    load_checkpoint(build_model(CFG, 4), two[1])


def test_time_budget_stops_with_a_resume_state_and_resuming_finishes_the_same_model(tmp_path):
    cfg = dataclasses.replace(CFG, epochs=4)
    full = train_cell(cfg, Cell(4, "copy", folder=tmp_path / "full"), **quiet)
    assert train_cell(cfg, Cell(4, "copy", folder=tmp_path / "cut"), deadline=time.time(), **quiet) is None
    assert not list((tmp_path / "cut").glob("*"))  # the deadline had passed before an epoch: nothing to save
    deadline = time.time() + 6  # room for one quick epoch on a busy CPU

    def wait_past_deadline_after_epoch_1(message):
        if message.startswith("4_heads_copy (seed 42): Epoch 1/"):
            time.sleep(max(0.0, deadline - time.time()))

    stopped = train_cell(cfg, Cell(4, "copy", folder=tmp_path / "cut"), save_every=0, deadline=deadline, progress=False,
                         log=wait_past_deadline_after_epoch_1)
    assert stopped is None and (tmp_path / "cut" / "4_heads_copy.pt.resume").is_file()
    resumed = train_cell(cfg, Cell(4, "copy", folder=tmp_path / "cut"), resume=True, **quiet)
    assert same_weights(weights(full), weights(resumed))
    sessions = torch.load(resumed, weights_only=True)["training"]["sessions"]
    assert [(s["first_epoch"], s["last_epoch"]) for s in sessions] == [(1, 1), (2, 4)]


def test_a_first_epoch_the_deadline_cuts_is_dropped_and_the_earlier_state_kept(tmp_path, monkeypatch):
    cfg = dataclasses.replace(CFG, epochs=4)
    with pytest.raises(KeyboardInterrupt):  # an earlier session leaves a resume state after epoch 2
        train_cell(cfg, Cell(4, "copy", folder=tmp_path), save_every=1, progress=True, log=interrupt_at(3))
    state = (tmp_path / "4_heads_copy.pt.resume").read_bytes()
    clock = {"now": 1000.0}  # a fake clock that only training steps advance, one second a step: no timing margin
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock["now"], perf_counter=time.perf_counter))
    step = learners.train_step
    monkeypatch.setattr(learners, "train_step", lambda *args, **kwargs: clock.update(now=clock["now"] + 1) or step(
        *args, **kwargs))
    for folder, resume in ((tmp_path / "fresh", False), (tmp_path, True)):
        messages = []
        assert train_cell(cfg, Cell(4, "copy", folder=folder), resume=resume, progress=False, log=messages.append,
                          deadline=clock["now"] + 2.5) is None  # passes after 3 of an epoch's 6 steps
        epoch = 3 if resume else 1
        assert messages[-1] == f"4_heads_copy (seed 42): time budget reached during epoch {epoch}/4, which is dropped"
    assert not (tmp_path / "fresh").exists() or not list((tmp_path / "fresh").glob("*"))
    assert (tmp_path / "4_heads_copy.pt.resume").read_bytes() == state and not (tmp_path / "4_heads_copy.pt").exists()


def test_default_threads_share_the_cores_among_the_cells_at_once(monkeypatch):
    monkeypatch.setattr(train.os, "cpu_count", lambda: 8)
    assert [train.default_threads(None, n) for n in (1, 2, 3, 8, 40)] == [8, 4, 2, 1, 1]
    assert train.default_threads(3, 8) == 3  # --threads as given
    monkeypatch.setattr(train.os, "cpu_count", lambda: None)
    assert train.default_threads(None, 1) == 1


def test_one_cell_alone_gets_every_core(tmp_path, monkeypatch):
    monkeypatch.setattr(train.os, "cpu_count", lambda: 2)
    path, = train_cells(dataclasses.replace(CFG, epochs=1), [Cell(1, "copy", folder=tmp_path)], **quiet)
    assert torch.load(path, weights_only=True)["training"]["threads"] == 2


def test_device_flag_is_checked():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            resolve_device("cuda:0")


def test_estimated_training_time_schedules_cells_on_free_workers():
    cfg = dataclasses.replace(CFG, epochs=2, num_sequences=10, batch_size=4)  # 3 steps per epoch: 6 steps per cell
    # worker A takes the 16-head cell (6 x 3 s = 18 s); worker B takes both 1-head cells (6 x 1 s each = 12 s)
    assert estimated_training_seconds(cfg, [16, 1, 1], 2, {16: 3.0, 1: 1.0}) == 18.0
    assert estimated_training_seconds(cfg, [16, 1, 1], 1, {16: 3.0, 1: 1.0}) == 30.0
    assert estimated_training_seconds(cfg, [1, 1, 16], 2, {16: 3.0, 1: 1.0}) == 24.0  # order matters: B idles
    assert 0 < seconds_per_step(CFG, 4, torch.device("cpu"), steps=1) < 10


def test_resume_skips_finished_cells_and_continues_the_rest(tmp_path):
    """--resume over a grid: a finished checkpoint (no resume state) is not trained again."""
    done = train_cell(CFG, Cell(1, "copy", folder=tmp_path), **quiet)
    before = done.read_bytes()
    messages = []
    paths = train_cells(CFG, [Cell(1, "copy", folder=tmp_path), Cell(4, "copy", folder=tmp_path)], jobs=1, resume=True,
                        progress=False, log=messages.append)
    assert paths == [done, tmp_path / "4_heads_copy.pt"] and done.read_bytes() == before
    assert messages[0] == f"1_heads_copy: already trained ({done}), skipped"
    assert not any(m.startswith("1_heads_copy: Epoch") for m in messages)
    retrained = train_cell(CFG, Cell(1, "copy", folder=tmp_path), resume=False, **quiet)  # without --resume: trains
    assert retrained == done and same_weights(weights(done), torch.load(io.BytesIO(before), weights_only=True)[
        "state_dict"])


def group_cells(folder, heads=(4, 4, 4)):
    return [Cell(h, t, s, folder / f"seed_{s}")
            for h, (t, s) in zip(heads, [("copy", 0), ("cycle", 0), ("copy", 1)])]


def test_a_group_trains_each_cell_as_it_would_train_alone_without_dropout(tmp_path):
    """Dropout off: cells trained together (stacked weights, one vmapped step, one Adam) match the same cells trained
    one by one, in losses and weights, within float tolerance; two head counts make two groups."""
    cfg = dataclasses.replace(CFG, dropout=0.0)
    cells = group_cells(tmp_path / "group", heads=(4, 4, 8))
    messages = []
    paths = train_cells(cfg, cells, threads=1, group=True, log=messages.append)
    assert sum(m.startswith("training a group of") for m in messages) == 2  # 4 heads (2 cells), 8 heads (1 cell)
    for cell, path in zip(cells, paths):
        alone = train_cell(cfg, Cell(cell.heads, cell.task, cell.seed, tmp_path / "alone" / str(cell.seed)), threads=1,
                           **quiet)
        grouped, single = (torch.load(p, weights_only=True) for p in (path, alone))
        assert grouped["training"]["losses"] == pytest.approx(single["training"]["losses"], rel=1e-5)
        for name, value in single["state_dict"].items():
            assert torch.allclose(grouped["state_dict"][name], value, atol=2e-3, rtol=0), name
        assert grouped["training"]["cell_seed"] == single["training"]["cell_seed"] and grouped["training"]["group"]
        load_checkpoint(build_model(cfg, cell.heads), path)  # today's format


def test_a_groups_dropout_draws_other_masks_for_every_cell():
    torch.manual_seed(0)
    model = build_model(CFG, 4)
    params, buffers = torch.func.stack_module_state([model, copy.deepcopy(model), copy.deepcopy(model)])
    tokens = torch.randint(0, CFG.vocab_size, (1, 5, CFG.seq_length)).expand(3, 5, CFG.seq_length)
    losses = learners.group_loss(model)(params, buffers, tokens, tokens)  # the same weights and data in every cell
    assert len(set(losses.tolist())) == 3  # so the masks differ
    ones = torch.func.vmap(lambda x: torch.nn.functional.dropout(x, CFG.dropout), randomness="different")(
        torch.ones(3, 200_000))  # the mechanism group_loss relies on: keep rate 1 - p in every cell
    keep = (ones != 0).float().mean(1)
    assert torch.allclose(keep, torch.full((3,), 1 - CFG.dropout), atol=0.004)
    assert not torch.equal(ones[0], ones[1])


def test_a_group_resumed_from_its_resume_states_equals_an_uninterrupted_group(tmp_path):
    full = train.train_here(CFG, group=True, cells=group_cells(tmp_path / "full")[:2], **quiet_group)
    cut = group_cells(tmp_path / "cut")[:2]
    with pytest.raises(KeyboardInterrupt):
        train.train_here(CFG, group=True, cells=cut, save_every=1, log=interrupt_on("4_heads_copy (seed 0): Epoch 3/"))
    messages = []
    resumed = train.train_here(CFG, group=True, cells=cut, resume=True, log=messages.append)
    assert "resuming after epoch 2/3" in messages[0]
    for a, b in zip(full, resumed):
        assert same_weights(weights(a), weights(b))
        sessions = torch.load(b, weights_only=True)["training"]["sessions"]
        assert [(s["first_epoch"], s["last_epoch"], s["group"]) for s in sessions] == [(1, 2, 2), (3, 3, 2)]
    with pytest.raises(ValueError, match="one head count"):
        train.train_here(CFG, group=True, cells=group_cells(tmp_path / "mixed", heads=(4, 8)), **quiet_group)
    partial = group_cells(tmp_path / "partial")[:2]
    with pytest.raises(KeyboardInterrupt):
        train.train_here(CFG, group=True, cells=partial, save_every=1, log=interrupt_on("Epoch 2/"))
    with pytest.raises(ValueError, match="belongs to another run or group"):  # a group's state, but a cell alone
        train_cell(CFG, partial[0], resume=True, **quiet)
    with pytest.raises(ValueError, match="belongs to another run or group"):  # the same cells as another group
        train.train_here(CFG, partial[::-1], group=True, resume=True, **quiet_group)
    next((tmp_path / "partial").rglob("4_heads_cycle.pt.resume")).unlink()
    with pytest.raises(ValueError, match="a group resumes whole"):
        train.train_here(CFG, group=True, cells=partial, resume=True, **quiet_group)



def test_status_reads_each_cells_files_and_estimates_the_hours_left(tmp_path):
    cells = group_cells(tmp_path)  # 4 heads: seed 0 copy, seed 0 cycle, seed 1 copy
    grouped = train.train_here(CFG, cells[:2], group=True, **quiet_group)  # finished: one session for two cells
    with pytest.raises(KeyboardInterrupt):  # stopped with a resume state after epoch 2
        train_cell(CFG, Cell(4, "copy", 1, folder=tmp_path / "seed_1"), save_every=1, progress=True,
                   log=interrupt_at(3))
    stopped = tmp_path / "seed_1" / "4_heads_copy.pt.resume"
    for path, seconds in ((grouped[0], 7200.0), (grouped[1], 7200.0), (stopped, 1800.0)):  # known session times
        state = torch.load(path, weights_only=True)
        (state["training"] if "training" in state else state)["sessions"][0]["seconds"] = seconds
        torch.save(state, path)
    rows, summary, hours_left = runs.training_status(CFG, cells + [dataclasses.replace(cells[2], heads=1)], "cpu", 2)
    assert [r["state"] for r in rows] == ["finished", "finished", "epoch 2/3", "not started"]
    assert [r["epochs"] for r in rows] == [3, 3, 2, 0]
    assert rows[0]["on"] == f"{hardware_name('cpu')} (cpu, {torch.get_num_threads()} thread(s))"
    assert [r["hours"] for r in rows] == [1.0, 1.0, 0.5, 0.0]  # the group's 2 h shared by its two cells
    assert summary.startswith("2 of 4 cells finished, 1 unfinished, 1 not started; 2.5 cell-hours spent.")
    assert np.isnan(hours_left)  # no 1-head session measured
    # By hand: a 4-head epoch took (3600 + 3600 + 1800) s / (3 + 3 + 2) epochs = 1125 s; one epoch is left
    _, summary, hours_left = runs.training_status(CFG, cells, "cpu", 2)
    assert hours_left == pytest.approx(1125 / 3600) and "0.3 cell-hours on cpu, 0.2 h with 2 at a time" in summary
    assert "4 heads 1125.0 s" in summary
    assert np.isnan(runs.training_status(CFG, cells, "cuda", 1)[2])  # no session on a GPU
    assert runs.training_status(CFG, cells[:2], "cpu", 2)[1].endswith("Nothing left.")


def test_status_flag_prints_and_trains_nothing(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "train.py", "--quick", "--seeds", "3", "--heads", "4", "--tasks", "copy",
                          "--status", "--ckpt-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| not started |" in out.stdout and "0 of 1 cells finished, 0 unfinished, 1 not started" in out.stdout
    assert not list(tmp_path.rglob("*"))


def test_killing_train_py_stops_its_workers(tmp_path):
    """A train.py killed outright (SIGKILL: no clean-up of its own) leaves no worker training on behind it."""
    import signal
    import subprocess
    import sys

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie is dead
        except FileNotFoundError:
            return False
    main = subprocess.Popen([sys.executable, "train.py", "--quick", "--epochs", "400", "--jobs", "2", "--heads", "1",
                             "4", "--tasks", "copy", "--ckpt-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert "Epoch 1/400" in main.stdout.readline()  # the workers are training
    children = subprocess.run(["pgrep", "-P", str(main.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2
    main.send_signal(signal.SIGKILL)
    main.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in children) and not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("flags, grouped", [((), False), (("--group", "no"), False), (("--group", "yes"), True)])
def test_group_flag_defaults_to_one_cell_per_process(flags, grouped):
    """--group: one cell per process unless asked (on every device: the grouped path is slower on a CPU and unmeasured
    on a GPU); a grouped run must be asked for."""
    import argparse
    from script_io import add_common_args, add_training_args
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    add_training_args(parser)
    args = parser.parse_args(["--quick", "--device", "cpu", *flags])
    assert (args.group == "yes") is grouped
    with pytest.raises(SystemExit):
        parser.parse_args(["--group", "auto"])


def test_retrain_in_groups_trains_every_cell_again(tmp_path, monkeypatch):
    """ensure_models(retrain=True, group=True), as main.py --retrain --group yes: existing checkpoints are trained
    again, in groups, and the models returned are the new ones."""
    monkeypatch.setattr(train, "warn_of_long_training", lambda *args, **kwargs: None)
    cfg = dataclasses.replace(CFG, epochs=1)
    cells = [Cell(4, "copy", folder=tmp_path), Cell(4, "cycle", folder=tmp_path)]
    for cell in cells:
        train_cell(cfg, cell, **quiet)
    models = train.ensure_models(cfg, cells, device=torch.device("cpu"), retrain=True, group=True)
    for cell in cells:
        facts = torch.load(cell.path, weights_only=True)["training"]
        assert facts["group"] == learners.group_label(cells) and models[cell][1]["group"] == facts["group"]
