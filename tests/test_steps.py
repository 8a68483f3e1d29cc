"""Step and generation tracking from timesteps alone."""

from adacache_fx.runtime.steps import StepTracker


def _events(timesteps, num_steps=None):
    tracker = StepTracker()
    out = []
    for t in timesteps:
        tracker.on_call(t)
        if num_steps is not None:
            tracker.num_steps = num_steps
        out.append((tracker.generation, tracker.step, tracker.slot))
    return out


def test_counting_down_with_restart():
    assert _events([999, 900, 800, 999, 900]) == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0)]


def test_counting_up_flow_schedule():
    assert _events([0.0, 0.25, 0.5, 0.0, 0.25]) == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0)]


def test_same_timestep_calls_get_slots():
    assert _events([999, 999, 900, 900]) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]


def test_num_steps_bounds_a_generation():
    # a second generation with the same (decreasing) schedule but no rise in between is impossible;
    # num_steps catches a schedule that restarts at a lower value
    assert _events([999, 500, 400, 300], num_steps=2) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_no_timestep_means_one_step_per_call():
    assert _events([None, None, None]) == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]


def test_explicit_generation_ignores_direction():
    tracker = StepTracker()
    tracker.start_generation(num_steps=3, explicit=True)
    for t in (1.0, 2.0, 1.5):
        tracker.on_call(t)
    assert (tracker.generation, tracker.step) == (0, 2)
