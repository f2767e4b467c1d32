"""How a training step is taken: one cell with its own model and Adam (OneCell), or a group of cells of one head
count stacked and stepped together by one vmapped forward and backward (Group). train.py's loop drives either.

    from learners import OneCell, Group, train_step
    learner = OneCell(cfg, cell, device)          # or Group(cfg, cells, device)
    losses = learner.step(batch)                  # batch (M, B): the sequences each cell trains on in this step
    learner.cell_states()                         # [(weights, Adam state)] of each cell, as one-cell runs hold them
"""
import copy
import zlib

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from checkpoints import Cell, build_model
from sequence_datasets import make_dataset


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


class OneCell:
    """One cell's model and Adam, stepped on the fast attention path (PyTorch's fused attention on a GPU,
    cpu_attention's kernel on a CPU), dropout drawn from torch's default generator seeded by the cell seed."""

    def __init__(self, cfg, cell, device, compile=False):
        data = make_dataset(cell.task, cfg.num_sequences, cfg.seq_length, cfg.vocab_size, cell.seed)
        self.inputs, self.targets = data.inputs.to(device), data.targets.to(device)
        torch.manual_seed(cell.cell_seed)  # initialisation and dropout
        self.model = build_model(cfg, cell.heads).to(device).train()
        self.optimizer = make_optimizer(self.model.parameters(), cfg, device)
        self.shuffles = [torch.Generator().manual_seed(cell.cell_seed)]
        self.step_model = torch.compile(self.model) if compile else self.model
        self.config = self.model.config
        self.label = None  # a lone cell belongs to no group

    def step(self, batch):
        """One Adam step on the sequences that batch (1, B) indexes; the loss, on the device."""
        return train_step(self.step_model, self.optimizer, self.inputs[batch[0]], self.targets[batch[0]])

    def load(self, states):
        self.model.load_state_dict(states[0]["model"])
        self.optimizer.load_state_dict(states[0]["optimizer"])

    def cell_states(self):
        """[(weights, Adam state)] of the cell."""
        return [(self.model.state_dict(), self.optimizer.state_dict())]


class Group:
    """Cells of one head count trained together, in one process, all cells in every step.

    A cell stays a cell: its initialisation from its cell seed, its own data and shuffling generator, its own Adam
    moments (one Adam over the stacked weights is elementwise), its own resume state and checkpoint in the one-cell
    formats. Their weights are stacked, and one vmapped forward and backward (group_loss) and one Adam step serve them
    all. Dropout masks come from the group's own generator (seeded from its cells), a different mask for every cell:
    a cell's masks depend on its group and differ from a single-cell run's, so a group resumes only as the same
    group."""

    def __init__(self, cfg, cells, device):
        if len({c.heads for c in cells}) != 1:
            raise ValueError(f"a group trains one head count, got {sorted({c.heads for c in cells})}")
        data = [make_dataset(c.task, cfg.num_sequences, cfg.seq_length, cfg.vocab_size, c.seed) for c in cells]
        self.inputs = torch.stack([d.inputs for d in data]).to(device)
        self.targets = torch.stack([d.targets for d in data]).to(device)
        models = []
        for c in cells:
            torch.manual_seed(c.cell_seed)  # each cell's own initialisation
            models.append(build_model(cfg, c.heads).to(device))
        self.shuffles = [torch.Generator().manual_seed(c.cell_seed) for c in cells]
        self.label = group_label(cells)  # recorded in its resume states and checkpoints
        torch.manual_seed(zlib.crc32("; ".join(self.label).encode()))  # the group's dropout stream
        self.params, self.buffers = stack_module_state(models)
        self.optimizer = make_optimizer(self.params.values(), cfg, device)
        self.loss_of = group_loss(models[0])
        self.config = models[0].config
        self.rows = torch.arange(len(cells), device=device)[:, None]

    def step(self, batch):
        """One vmapped Adam step, cell m on the sequences batch[m] indexes; the cells' losses (M,), on the device."""
        loss = self.loss_of(self.params, self.buffers, self.inputs[self.rows, batch], self.targets[self.rows, batch])
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # each cell's weights get the gradient of its own loss
        self.optimizer.step()
        return loss.detach()

    def load(self, states):
        with torch.no_grad():
            for name, value in self.params.items():
                value.copy_(torch.stack([state["model"][name] for state in states]))
        self.optimizer.load_state_dict(_stack_optimizer_state([state["optimizer"] for state in states]))

    def cell_states(self):
        """[(weights, Adam state)] of each cell, as a one-cell run would hold them."""
        optimizer_state = self.optimizer.state_dict()
        return [({k: v[m].detach() for k, v in self.params.items()}, _cell_optimizer_state(optimizer_state, m))
                for m in range(len(self.shuffles))]


def group_label(cells):
    """What a group's resume states and checkpoints record of it, and what seeds its dropout stream."""
    return [f"seed {c.seed}, {c.heads} heads, {c.task}" for c in cells]


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


# Steps of fresh models on a random batch, for timing (train.py's estimates, bench.py)
def timing_step(cfg, heads, device, explicit_attention=False):
    """One training step of a fresh model on a random batch, as a callable returning the loss: for timing."""
    model = build_model(cfg, heads).to(device).train()
    optimizer = make_optimizer(model.parameters(), cfg, device)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_length), device=device)
    return lambda: train_step(model, optimizer, x, x, explicit_attention=explicit_attention)


def group_timing_step(cfg, heads, cells, device):
    """One grouped training step (Group.step) of `cells` fresh stacked models, as a callable returning the cells'
    losses: for timing."""
    group = Group(cfg, [Cell(heads, "copy", seed=seed) for seed in range(cells)], device)
    batch = torch.arange(cfg.batch_size, device=device).expand(cells, cfg.batch_size)
    return lambda: group.step(batch)
