import math

import torch

from lorafit.compute.batches import BlockStream
from lorafit.compute.perplexity import LossResult
from lorafit.training.loop import LoopState, record_validation


def test_block_stream_covers_each_epoch_once_and_is_deterministic():
    stream = BlockStream(num_blocks=10, batch_size=4, seed=3)
    seen = torch.cat([stream.next_indices() for _ in range(5)]).tolist()  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # reshuffled each epoch
    again = BlockStream(num_blocks=10, batch_size=4, seed=3)
    assert torch.cat([again.next_indices() for _ in range(5)]).tolist() == seen


def test_block_stream_ranks_split_the_global_batch():
    ranks = [BlockStream(num_blocks=12, batch_size=2, seed=0, rank=r, world_size=3) for r in range(3)]
    single = BlockStream(num_blocks=12, batch_size=6, seed=0)
    for _ in range(3):
        assert torch.cat([s.next_indices() for s in ranks]).tolist() == single.next_indices().tolist()


def test_early_stopping_keeps_best_weights():
    model = torch.nn.Linear(2, 2)
    state = LoopState()
    logged = []
    for step, loss in enumerate([2.0, 1.0, 1.5, 1.7], start=1):
        state.step = step
        with torch.no_grad():
            model.weight.fill_(step)
        record_validation(state, model, LossResult(nll_sum=loss * 10, tokens=10), patience=2, log_metrics=logged.append)
    assert state.best_step == 2 and state.stopped_early
    assert torch.all(state.best_trainable["weight"] == 2)
    assert logged[1] == {"step": 2, "valid_loss": 1.0, "valid_ppl": round(math.exp(1.0), 4)}


def test_loss_spike_is_logged_against_the_running_median():
    from lorafit.training.loop import warn_on_spike

    state, logged = LoopState(), []
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.2, 1.8, 2.0, 2.1, 1.9, 2.0, 5.5, 2.0]):
        state.step = step
        warn_on_spike(state, loss, factor=2.5, log_metrics=logged.append)
    assert logged == [{"step": 11, "event": "loss_spike", "loss": 5.5, "median": 2.0}]
    warn_on_spike(state, 50.0, factor=0.0, log_metrics=logged.append)  # 0 turns it off
    assert len(logged) == 1
