"""The data-parallel step with two ranks in this process (tests/thread_world.py): their summed gradients give the
weights one process trains, and an out-of-memory on one rank makes every rank halve and redo the same window.
tests/test_distributed.py runs the same under torchrun, with processes and gloo."""
import threading

import pytest
import torch
from test_trainer import make_trainer
from thread_world import run_ranks

from enhanced_tft.training.trainer import Trainer


@pytest.fixture
def ddp_raw(small_raw):
    small_raw["model"]["dropout_rate"] = 0.0   # fp32, no dropout: the same windows give the same weights
    small_raw["train"].update(micro_batch_size=16, gradient_accumulation_steps=4, epochs=2, max_steps_per_epoch=6,
                              early_stopping_patience=5)
    return small_raw


def _fit_on_ranks(raw, data, size: int) -> list:
    """Each rank builds the same model (same seed) and trains its share of every window."""
    reference, _ = make_trainer(raw, data)   # the single process's initial weights, given to every rank
    initial = {k: v.clone() for k, v in reference.model.state_dict().items()}

    def work(world):
        trainer, _ = make_trainer(raw, data)
        trainer.model.load_state_dict(initial)
        ranked = Trainer(trainer.model, data, trainer.cfg, trainer.device, trainer.policy, seed=trainer.cfg.seed,
                         world=world)
        return ranked, ranked.fit()
    return run_ranks(size, work)


def test_two_ranks_in_one_process_train_the_weights_of_one_process(ddp_raw):
    single, data = make_trainer(ddp_raw)
    expected = single.fit()
    (rank0, fit0), (rank1, fit1) = _fit_on_ranks(ddp_raw, data, 2)
    assert rank0.micro_batch_size == rank1.micro_batch_size == 16 and rank0.accumulation_steps == 2   # 32 of 64
    assert fit0.optimizer_steps == fit1.optimizer_steps == expected.optimizer_steps == 12
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0.model.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)
        assert torch.equal(rank0.model.state_dict()[name], rank1.model.state_dict()[name]), name   # one model
    assert fit0.best_val_loss == pytest.approx(expected.best_val_loss, abs=1e-6)


def test_an_oom_on_one_rank_halves_the_micro_batch_on_every_rank(ddp_raw, inject_faults, caplog):
    single, data = make_trainer(ddp_raw)
    single.fit()
    fired = []

    def oom_on_rank_1(phase, step, index, indices):   # rank 1, step 3, its second micro-batch, once
        if (phase, step, index) == ("train", 3, 1) and threading.current_thread().name == "rank1" and not fired:
            fired.append(indices.numel())
            raise torch.OutOfMemoryError("injected on rank 1")
    inject_faults(oom_on_rank_1)
    with caplog.at_level("WARNING"):
        (rank0, fit0), (rank1, fit1) = _fit_on_ranks(ddp_raw, data, 2)
    assert fired == [16]
    assert (fit0.oom_recoveries, fit1.oom_recoveries) == (1, 1)                 # rank 0 halved as well
    assert rank0.micro_batch_size == rank1.micro_batch_size == 8 and rank0.accumulation_steps == 4
    assert caplog.text.count("out of memory in train step 3: micro-batch 16 -> 8") == 2
    for name, value in single.model.state_dict().items():                     # the window was redone, nothing lost
        torch.testing.assert_close(rank0.model.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)
