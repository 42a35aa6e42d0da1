import math

import pytest

from lightning_compress.schedules import (
    SCHEDULE_KINDS,
    Schedule,
    interpolate,
    resolve_window,
    validate_window,
)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_endpoints(kind: str) -> None:
    s = Schedule(kind, initial=0.1, final=0.9, start_step=10, end_step=110)
    assert s.value_at(0) == pytest.approx(0.1)
    assert s.value_at(9) == pytest.approx(0.1)
    assert s.value_at(110) == pytest.approx(0.9)
    assert s.value_at(10_000) == pytest.approx(0.9)


@pytest.mark.parametrize("kind", ["linear", "cubic", "exponential"])
def test_monotone_between(kind: str) -> None:
    s = Schedule(kind, initial=0.0, final=0.95, start_step=0, end_step=100)
    values = [s.value_at(t) for t in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert 0.0 < values[50] < 0.95


def test_cubic_is_zhu_gupta() -> None:
    s_i, s_f, t0, n = 0.05, 0.9, 20, 80
    s = Schedule("cubic", s_i, s_f, t0, t0 + n)
    for t in (20, 35, 60, 99):
        assert s.value_at(t) == pytest.approx(s_f + (s_i - s_f) * (1 - (t - t0) / n) ** 3)


def test_cubic_front_loaded_vs_linear() -> None:
    assert interpolate("cubic", 0.3, 0, 1) > interpolate("linear", 0.3, 0, 1) > interpolate("exponential", 0.01, 0, 1)


def test_exponential_hits_final_and_decreasing_works() -> None:
    assert interpolate("exponential", 1.0, 4.0, 1.0) == pytest.approx(1.0)
    assert interpolate("exponential", 0.0, 4.0, 1.0) == pytest.approx(4.0)
    assert math.isfinite(interpolate("exponential", 0.5, 4.0, 1.0))


def test_one_shot_jumps_at_start() -> None:
    s = Schedule("one_shot", 0.0, 0.5, start_step=5, end_step=5)
    assert [s.value_at(t) for t in (4, 5, 6)] == [0.0, 0.5, 0.5]


def test_bad_schedules_raise() -> None:
    with pytest.raises(ValueError, match="ends before it starts"):
        Schedule("linear", 0, 1, start_step=10, end_step=5)
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        Schedule("quadratic", 0, 1, 0, 1)
    with pytest.raises(ValueError, match="`start_step` must be >= 0"):
        Schedule("linear", 0, 1, -1, 1)


def test_validate_window_errors() -> None:
    with pytest.raises(ValueError, match="not both"):
        validate_window(0, 10, 1.0, None)
    with pytest.raises(ValueError, match="`end_epoch`=1.0 < `start_epoch`=2.0"):
        validate_window(None, None, 2.0, 1.0)
    with pytest.raises(ValueError, match="`kd_start_step` must be an integer"):
        validate_window(-3, None, None, None, prefix="kd_")
    validate_window(None, None, 0.5, 1.5)


def test_resolve_window_uses_real_trainer(tiny_module, make_trainer) -> None:
    windows = {}

    from lightning.pytorch.callbacks import Callback

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            windows["epochs"] = resolve_window(trainer, None, None, 0.5, 1.5)
            windows["steps"] = resolve_window(trainer, 3, 7, None, None)
            with pytest.raises(ValueError, match="has only 16 optimizer steps"):
                resolve_window(trainer, None, None, 0.0, 5.0)

    # 128 samples / batch 16 = 8 batches; accumulate 2 -> 4 optimizer steps per epoch, 4 epochs = 16 steps
    make_trainer(max_epochs=4, accumulate_grad_batches=2, callbacks=[Probe()]).fit(tiny_module)
    assert windows["epochs"] == (2, 6)
    assert windows["steps"] == (3, 7)


def test_epochs_to_steps_when_the_run_is_given_in_max_steps(tiny_module, make_trainer) -> None:
    # Trainer(max_steps=N) sets max_epochs=-1: Lightning's estimated_stepping_batches then returns max_steps without
    # loading the train dataloader, so the epoch length was unknown in on_fit_start ("the train dataloader has no
    # length") although the loader has 8 batches
    from lightning.pytorch.callbacks import Callback

    from lightning_compress.schedules import epochs_to_steps

    seen = {}

    class Probe(Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["window"] = resolve_window(trainer, None, None, 0.5, 2.0)
            seen["steps"] = epochs_to_steps(1.5, trainer)

    trainer = make_trainer(max_epochs=None, max_steps=20, accumulate_grad_batches=2, callbacks=[Probe()])
    trainer.fit(tiny_module)
    assert seen == {"window": (2, 8), "steps": 6}
