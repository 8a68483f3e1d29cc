"""Drive a policy outside a model, as the runtime does: one fresh state per generation.

    live = Live(TeaCache(delta=0.1))
    plan = live.decide(ctx, slot, signal)     # policy.decide(ctx, live.state, slot, signal)
    live.state.accumulated(0)

Settings and pure helpers (``simulate``, ``advance``, ``ratio_for``...) are the policy's own
(``live.simulate(...)``); ``reset()`` starts a new state, and so does a context of another
generation, since the runtime gives every generation a fresh state.
"""

from __future__ import annotations

from typing import Any


class Live:
    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.state = policy.new_state()
        self._generation: int | None = None

    def _state(self, ctx: Any) -> Any:
        generation = getattr(ctx, "generation", None)
        if generation is not None:
            if self._generation is not None and generation != self._generation:
                self.reset()
            self._generation = generation
        return self.state

    def reset(self) -> None:
        self.state = self.policy.new_state()

    def setup(self, branches) -> None:
        self.policy.validate(branches)

    def plan(self, ctx):
        return self.policy.plan(ctx, self._state(ctx))

    def decide(self, ctx, slot, signal):
        return self.policy.decide(ctx, self._state(ctx), slot, signal)

    def observe(self, ctx, branch, new, previous):
        return self.policy.observe(ctx, self._state(ctx), branch, new, previous)

    def forecast(self, ctx, branch, history):
        return self.policy.forecast(ctx, self._state(ctx), branch, history)

    def observe_guidance(self, ctx, output, cond, uncond):
        return self.policy.observe_guidance(ctx, self._state(ctx), output, cond, uncond)

    def rebuild_uncond(self, ctx, output, cond):
        return self.policy.rebuild_uncond(ctx, self._state(ctx), output, cond)

    def caches(self, branch):
        return self.policy.caches(branch, self.state)

    def watches(self, branch):
        return self.policy.watches(branch, self.state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)
