"""A cell's checkpoint: what a cell is, where its files live, and how its model is built, saved, loaded and checked.

    from checkpoints import Cell, load_model
    cell = Cell(heads=4, task="copy", seed=42, folder=Path("checkpoints"))
    cell.path, cell.resume_path, cell.cell_seed   # checkpoints/4_heads_copy.pt, its .resume beside it, a CRC-32
    model, facts = load_model(PAPER, cell.heads, cell.path, "cpu")    # eval mode; facts: how it was trained

The format (FORMAT in config.py) is a dict: the weights (`state_dict`, on the CPU), the model's `config` and the
training facts (`training`: seed, losses, sessions with device, hardware, threads and seconds). load_checkpoint also
reads the authors' plain state_dicts, whose head count only their {H}_heads_{task}.pt file name gives.
"""
import dataclasses
import re
import zlib
from pathlib import Path

import torch

from config import CKPT_DIR, FORMAT, SEED, training_settings
from script_io import write_atomic
from transformer import Transformer


def cell_seed(seed, heads, task):
    """A stable per-cell seed (Python's hash() of a string changes between runs; CRC-32 does not)."""
    return zlib.crc32(f"{seed}/{heads}/{task}".encode())


def checkpoint_path(folder, heads, task):
    return Path(folder) / f"{heads}_heads_{task}.pt"


def resume_path_of(path):
    """Where an unfinished cell keeps its resume state: beside its checkpoint path, with .resume appended."""
    return path.with_name(path.name + ".resume")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One model of the experiment grid: a head count and a task, trained from `seed` into `folder`."""
    heads: int
    task: str
    seed: int = SEED
    folder: Path = CKPT_DIR

    @property
    def path(self):
        return checkpoint_path(self.folder, self.heads, self.task)

    @property
    def resume_path(self):
        return resume_path_of(self.path)

    @property
    def cell_seed(self):
        """Seeds the cell's initialisation, dropout and shuffling; the task's data depends on (seed, task) only."""
        return cell_seed(self.seed, self.heads, self.task)

    @property
    def name(self):
        """How logs name the cell: 4_heads_copy (seed 42)."""
        return f"{self.path.stem} (seed {self.seed})"

    def run_facts(self, cfg):
        """What a resume state must match to continue this cell: its head count, task, seed and training settings
        (recorded as hyperparameters; evaluation settings are no part of a run)."""
        return dict(heads=self.heads, task=self.task, seed=self.seed, hyperparameters=training_settings(cfg))


def run_difference(recorded, wanted):
    """The first way a recorded run (a resume state's run facts) differs from `wanted`, as "NAME: VALUE in the file,
    VALUE now"; None when they are the same run. Older files also recorded evaluation settings among the
    hyperparameters, and may lack a later training setting: only the training settings both hold are compared."""
    recorded = recorded or {}
    for key in ("heads", "task", "seed"):
        if recorded.get(key) != wanted[key]:
            return f"{key}: {recorded.get(key)!r} in the file, {wanted[key]!r} now"
    stored = recorded.get("hyperparameters", {})
    for name, value in wanted["hyperparameters"].items():
        if name in stored and stored[name] != value:
            return f"{name}: {stored[name]!r} in the file, {value!r} now"
    return None


def build_model(cfg, heads):
    return Transformer(cfg.vocab_size, cfg.embed_dim, heads, cfg.num_layers, cfg.mlp_hidden_dim, cfg.seq_length,
                       dropout=cfg.dropout)


def save_checkpoint(path, obj):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path, device="cpu"):
    """The object saved at `path` (weights only: no code is unpickled); a clear error if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: expected a file written by train.py "
                                f"or one of the authors' {{H}}_heads_{{task}}.pt state_dicts")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint (truncated or foreign file?): "
                         f"{type(error).__name__}: {str(error)[:200]}") from error


def _state_and_facts(obj, path, model):
    """The weights and training facts in `obj`, after checking that they are of `model`'s architecture."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        differ = {k: (obj["config"].get(k), v) for k, v in model.config.items() if obj["config"].get(k) != v}
        if differ:
            raise ValueError(f"{path} holds a different model: " + ", ".join(
                f"{k}={stored} in the file but {k}={wanted} expected" for k, (stored, wanted) in differ.items()))
        return obj["state_dict"], obj.get("training", {})
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # Every head count has the same weight shapes: only the file name tells the authors' models apart.
        name = re.fullmatch(r"(\d+)_heads_\w+\.pt", path.name)
        if name is None:
            raise ValueError(f"{path} is a plain state_dict, whose head count can only be read from a file name of "
                             f"the form {{H}}_heads_{{task}}.pt; rename it so")
        if int(name[1]) != model.config["num_heads"]:
            raise ValueError(f"{path} holds a {name[1]}-head model but the model expects "
                             f"{model.config['num_heads']} heads")
        return obj, {"source": "plain state_dict (the authors' format)"}
    raise ValueError(f"{path} is neither a checkpoint of this repo (format {FORMAT!r}) nor a plain state_dict")


def load_checkpoint(model, path, device="cpu"):
    """Load weights from this repo's format or the authors' plain state_dict into `model`; returns the stored training
    facts. The head count is checked: against the stored config, or for the authors' files against the file name."""
    path = Path(path)
    state, facts = _state_and_facts(read_checkpoint(path, device), path, model)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit the model: missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state)
    return facts


def load_model(cfg, heads, path, device):
    """A model of the config's architecture with the checkpoint's weights, in eval mode, and its training facts."""
    model = build_model(cfg, heads).to(device)
    facts = load_checkpoint(model, path, device)
    return model.eval(), facts


def save_trained(cell, cfg, *, state_dict, model_config, losses, sessions, tf32, **extra):
    """A finished cell's checkpoint (weights, model config, training facts), written atomically; its resume state
    deleted. Returns the path."""
    facts = dict(task=cell.task, epochs=len(losses), seed=cell.seed, cell_seed=cell.cell_seed,
                 final_loss=losses[-1] if losses else None, losses=losses, torch_version=str(torch.__version__),
                 device=sessions[-1]["device"], hardware=sessions[-1]["hardware"], threads=sessions[-1]["threads"],
                 tf32=tf32, train_seconds=round(sum(s["seconds"] for s in sessions), 1), sessions=sessions,
                 hyperparameters=training_settings(cfg), **extra)
    state = {k: v.detach().cpu() for k, v in state_dict.items()}  # loadable on any machine, GPU or not
    save_checkpoint(cell.path, {"format": FORMAT, "state_dict": state, "config": model_config, "training": facts})
    cell.resume_path.unlink(missing_ok=True)
    return cell.path


def seed_folder(ckpt_dir, seed):
    """Where the seed study keeps training run `seed`'s checkpoints: CKPT_DIR/seeds/seed_S."""
    return Path(ckpt_dir) / "seeds" / f"seed_{seed}"
