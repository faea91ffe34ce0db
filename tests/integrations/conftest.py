"""Tiny models train fastest on one thread; with two, OpenMP's spinning threads lose most of the
time to the scheduler whenever the machine is busy (9 s instead of 0.6 s for 8 GPT-2 micro-batches)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
