import doctest

import numpy as np
import pytest
import torch

from corrtools.errors import CorrtoolsError
from corrtools.workloads import CharLMConfig, CharLMWorkload, charlm
from corrtools.workloads.text import VOCAB, VOCAB_SIZE, decode, encode, stdlib_text

TINY = CharLMConfig(d_model=32, n_layer=1, n_head=2, seq_len=16, batch_size=8, steps=60,
                    text_bytes=200_000)


def test_text_is_stdlib_source_and_roundtrips():
    text = stdlib_text(50_000)
    assert len(text) == 50_000
    assert "def " in text and "import " in text
    ids = encode(text)
    assert ids.dtype == np.uint8 and ids.max() < VOCAB_SIZE
    ascii_only = "".join(c for c in text if c in VOCAB[1:])
    assert decode(encode(ascii_only)) == ascii_only


def test_unknown_characters_map_to_other():
    assert encode("é\u2603a").tolist() == [0, 0, VOCAB.index("a")]


def test_same_seed_same_losses_different_seed_different():
    first = CharLMWorkload(TINY).train_step()
    wl1, wl2 = CharLMWorkload(TINY), CharLMWorkload(TINY)
    l1 = [wl1.train_step() for _ in range(5)]
    l2 = [wl2.train_step() for _ in range(5)]
    assert l1 == l2 and l1[0] == first
    wl3 = CharLMWorkload(CharLMConfig(**{**TINY.to_dict(), "seed": 1}))
    assert [wl3.train_step() for _ in range(5)] != l1


def test_training_lowers_the_loss():
    wl = CharLMWorkload(TINY)
    before = wl.evaluate(4)
    for _ in range(TINY.steps):
        wl.train_step()
    after = wl.evaluate(4)
    assert after < before - 0.5  # from ~ln(98)=4.6 nats


def test_after_step_runs_between_step_and_zero_grad():
    wl = CharLMWorkload(TINY)
    seen = []
    wl.train_step(after_step=lambda: seen.append(wl.model.head.weight.grad is not None))
    assert seen == [True]
    assert wl.model.head.weight.grad is None


def test_parameter_names_match_the_design():
    names = dict(CharLMWorkload(TINY).model.named_parameters())
    for n in ("embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
              "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"):
        assert n in names


@pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step")
def test_cosine_schedule_warms_up_and_decays():
    wl = CharLMWorkload(CharLMConfig(**{**TINY.to_dict(), "warmup_steps": 10, "steps": 40}))
    lrs = []
    for _ in range(40):
        lrs.append(wl.optimizer.param_groups[0]["lr"])
        wl.scheduler.step()
    assert lrs[0] == pytest.approx(TINY.lr / 10)
    assert max(lrs) == pytest.approx(TINY.lr)
    assert lrs[-1] == pytest.approx(0.1 * TINY.lr, rel=0.05)


@pytest.mark.parametrize("kwargs", [dict(d_model=30, n_head=4), dict(optimizer="lion"),
                                    dict(schedule="step"), dict(steps=0)])
def test_bad_config_is_a_clear_error(kwargs):
    with pytest.raises(CorrtoolsError):
        CharLMConfig(**kwargs)


def test_docstring_examples_run():
    torch.manual_seed(0)
    assert doctest.testmod(charlm).failed == 0
