"""The two synthetic tasks of Section 4: random token sequences, copied (copy) or rolled right by one (cycle).

The whole data set is two tensors, made at once from an explicit seed, so training can index batches on the device:

    from sequence_datasets import make_dataset
    data = make_dataset("cycle", num_sequences=5000, seq_length=100, vocab_size=256, seed=42)
    data.inputs, data.targets   # (5000, 100) int64 each; data[i] -> (inputs[i], targets[i])
"""
import torch
from torch.utils.data import Dataset


class SequenceDataset(Dataset):
    """Uniform random tokens in [0, vocab_size); the target is a function of the input given by `target_of`."""

    def __init__(self, num_sequences, seq_length, vocab_size, seed):
        for name, value in (("num_sequences", num_sequences), ("seq_length", seq_length), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randint(0, vocab_size, (num_sequences, seq_length), generator=generator)
        self.targets = self.target_of(self.inputs)

    @staticmethod
    def target_of(inputs):
        raise NotImplementedError

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


class CopyDataset(SequenceDataset):
    """Target = input."""

    @staticmethod
    def target_of(inputs):
        return inputs.clone()


class CycleDataset(SequenceDataset):
    """Target = input rolled right by one: y_t = x_{t-1}, y_0 = x_{T-1} (unpredictable under a causal mask)."""

    @staticmethod
    def target_of(inputs):
        return inputs.roll(1, dims=-1)


TASKS = {"copy": CopyDataset, "cycle": CycleDataset}


def make_dataset(task, num_sequences, seq_length, vocab_size, seed):
    """The data of a task depends only on (task, seed): every head count trains on the same sequences."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
    return TASKS[task](num_sequences, seq_length, vocab_size, seed)
