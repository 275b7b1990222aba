"""Running the policy against a robot: asynchronous execution (the next inference on a worker thread while the
robot executes the current chunk) and a stand-in robot that plays back recorded observations."""
from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Policy


class AsyncPolicy:
    """Asynchronous execution: the next inference runs on a worker thread while the robot executes the current
    chunk. `submit(observation, state)` returns a Future of the StepResult; calls are processed in order."""

    def __init__(self, policy: Policy):
        self.policy = policy
        # the worker keeps the caller's intra-op thread count, so its results are bit-identical to a direct run
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dz-policy",
                                                           initializer=torch.set_num_threads,
                                                           initargs=(torch.get_num_threads(),))
        self._lock = threading.Lock()

    def submit(self, observation, state) -> concurrent.futures.Future:
        def work():
            with self._lock:
                return self.policy.step(observation, state)
        return self._pool.submit(work)

    def close(self):
        self._pool.shutdown(wait=True)


def playback_loop(policy: Policy, observations: list, states: list, execute=None, asynchronous: bool = True) -> list:
    """A stand-in robot: plays back recorded observations (latent frames per chunk; the first entry None) and
    states, executing each returned chunk with `execute(actions)` (default: nothing) while the next inference runs.
    Returns the list of StepResults."""
    results = []
    if not asynchronous:
        for obs, st in zip(observations, states):
            r = policy.step(obs, st)
            if execute:
                execute(r.actions)
            results.append(r)
        return results
    runner = AsyncPolicy(policy)
    try:
        fut = runner.submit(observations[0], states[0])
        for obs, st in zip(observations[1:], states[1:]):
            r = fut.result()
            fut = runner.submit(obs, st)        # the next inference starts before the robot executes this chunk
            if execute:
                execute(r.actions)
            results.append(r)
        r = fut.result()
        if execute:
            execute(r.actions)
        results.append(r)
    finally:
        runner.close()
    return results
