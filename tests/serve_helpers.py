"""Shared by the policy-server tests (test_serve*.py): the tiny served model, random episodes of the protocol's
shapes, the same episode run directly on a Policy, and a Policy whose step waits for the test (GatedPolicy).

Every server in those tests listens on 127.0.0.1 on a free port and runs the tiny random model with one denoising
step.
"""
import threading
import time

import numpy as np
import torch

from dreamzero.engine import Policy, PolicyConfig
from dreamzero.serve import unpack
from tiny import tiny_model

F32 = np.float32
ERROR_REPLY_BYTES = 2048        # an error reply: MAX_ERROR_CHARS of detail plus the envelope


def serve_model():
    """The served model: the tiny DreamZero with Wan's init (each test file makes it once, in a module fixture)."""
    return tiny_model(std=None).eval()


def new_policy(model, **kw):
    kw.setdefault("negative_prompt", None)      # zero features for the unconditional branch (no text encoder here)
    return Policy(model, PolicyConfig(num_steps=1, **kw))


def episode(cfg, batch=2, chunks=4, seed=0):
    """Random features of the protocol's shapes: the reset's arrays, then per step (observation or None, state)."""
    rng = np.random.default_rng(seed)
    H, W = cfg.latent_height, cfg.latent_width
    reset = dict(text=rng.standard_normal((batch, cfg.text_len, cfg.text_dim)).astype(F32),
                 clip=rng.standard_normal((batch, cfg.clip_tokens, cfg.clip_dim)).astype(F32),
                 first_latent=rng.standard_normal((batch, cfg.latent_channels, 1, H, W)).astype(F32),
                 embodiment=np.arange(batch, dtype=np.int64) % cfg.num_embodiments)
    steps = [(None if i == 0 else rng.standard_normal((batch, cfg.latent_channels, cfg.frames_per_chunk, H, W))
              .astype(F32), rng.standard_normal((batch, cfg.states_per_chunk, cfg.state_dim)).astype(F32))
             for i in range(chunks)]
    return reset, steps


def run_direct(policy, reset, steps):
    t = torch.from_numpy
    policy.reset(t(reset["text"]), t(reset["clip"]), t(reset["first_latent"]), embodiment=t(reset["embodiment"]))
    return [policy.step(None if o is None else t(o), t(s)) for o, s in steps]


def send_raw(client, raw):
    client.ws.send(raw)
    return unpack(client.ws.recv(timeout=60))


class GatedPolicy:
    """A Policy whose step waits for the test to open a gate: makes 'a request is running' deterministic."""

    def __init__(self, inner):
        self.inner, self.cfg, self.config = inner, inner.cfg, inner.config
        self.device, self.dtype = inner.device, inner.dtype
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls = 0
        self.fail_next = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):       # never leave the server's worker waiting, whatever the test did
        self.release.set()

    @property
    def chunk(self):
        return self.inner.chunk

    def reset(self, *args, **kw):
        return self.inner.reset(*args, **kw)

    def step(self, observation, state):
        self.calls += 1
        self.entered.set()
        if not self.release.wait(60):
            raise RuntimeError("the test never opened the gate")
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated failure")
        return self.inner.step(observation, state)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
