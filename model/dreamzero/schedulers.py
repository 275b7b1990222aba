"""Flow-matching schedules of DreamZero: the training table and the inference samplers.

Convention (the release's): sigma = 1 is pure noise, sigma = 0 is clean data, and

    x_sigma = (1 - sigma) * x0 + sigma * noise,        velocity v = d x_sigma / d sigma = noise - x0.

The model's time embedding receives ``timestep = sigma * 1000``.

Contents
--------
``FlowMatchTrainingSchedule``
    The 1000-entry training table of the release (noise first, shift 5), its bell-shaped loss weight,
    ``add_noise`` / ``velocity_target`` and the timestep draws: uniform (base model) and
    DreamZero-Flash (``r ~ Beta(7, 1)``, ``index = (1 - r) * 1000``: mostly the noisiest entries).
``inference_schedule``
    The sigmas / integer timesteps of the release's ``FlowUniPCMultistepScheduler.set_timesteps``.
``FlowEulerSampler``, ``FlowUniPCMultistepSampler``
    Samplers on that schedule: ``step(v, x, step_index) -> x_next``. The UniPC sampler is the release's
    algorithm (UniPC, B(h) = e^h - 1 ("bh2"), data prediction x0 = x - sigma * v, order 2 with warm-up,
    corrector on, lower order at the final step). All step coefficients are computed once per schedule in
    float64 on the host, so a step is a few element-wise tensor ops with no host/device synchronisation.

Facts read from the release (groot/vla/model/dreamzero)
-------------------------------------------------------
* Training table: ``FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)`` with
  ``set_timesteps(1000, training=True)``: unshifted sigma = linspace(1, 0, 1001)[:-1] = 1, 0.999, ..., 0.001
  (float32), shifted sigma' = 5 sigma / (1 + 4 sigma), so the table runs from 1.0 down to 0.00498
  (the class default sigma_min = 0.003/1.002 is *not* what the action head uses).
  Weights: y = exp(-2 ((t - 500) / 1000)^2) on t = sigma' * 1000, w = (y - min y) * 1000 / sum(y - min y):
  mean 1, and 0 at the pure-noise entry (t = 1000 is the farthest from 500).
* Inference: ``FlowUniPCMultistepScheduler(shift=1)`` then ``set_timesteps(N, shift=5.0)``: the constructor
  leaves sigma_max = float32(0.999), sigma_min = 0, so the unshifted grid is
  linspace(0.999, 0, N + 1)[:-1] (float64), shifted, timesteps = int64(sigma' * 1000) (truncation),
  a final sigma 0 appended and the sigmas stored as float32. For N = 16 the first sigma is 0.99980 (not 1).
* diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=5)`` runs the same update but builds
  its grid as linspace(1, 1/1000, N + 1)[:-1]: exactly 1/1000 above the release's grid before the shift
  (and its first sigma is clamped to 1 - 1e-6). Fed the release's grid through ``set_timesteps(sigmas=...)``
  it produces the same sigmas and the same steps (tests/test_schedulers.py checks both facts).
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = [
    "shift_sigma",
    "add_noise",
    "velocity_target",
    "TrainingDraw",
    "FlowMatchTrainingSchedule",
    "inference_schedule",
    "FlowEulerSampler",
    "FlowUniPCMultistepSampler",
]


def _check_shift(shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise TypeError(f"shift must be a number, got {type(shift).__name__}")
    shift = float(shift)
    if not (math.isfinite(shift) and shift > 0.0):
        raise ValueError(f"shift must be finite and > 0, got {shift}")
    return shift


def _check_count(name: str, n) -> int:
    if isinstance(n, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def shift_sigma(sigma, shift: float):
    """The timestep shift of Wan / DreamZero: ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.

    Works on Python floats, numpy arrays and tensors (any shape); keeps 0 -> 0 and 1 -> 1, and pushes the
    grid towards the noisy end for ``shift > 1``.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor | float:
    """Bring sigma (float, or tensor whose shape is a prefix of ``x.shape``) into a broadcastable shape."""
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        return float(sigma)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    if not sigma.is_floating_point():
        raise TypeError(f"sigma must be a floating tensor, got {sigma.dtype}")
    if sigma.device != x.device:
        raise ValueError(f"sigma is on {sigma.device} but the sample is on {x.device}")
    if sigma.dim() > x.dim() or tuple(sigma.shape) != tuple(x.shape[: sigma.dim()]):
        raise ValueError(
            f"sigma shape {tuple(sigma.shape)} must be a prefix of the sample shape {tuple(x.shape)} "
            "(one sigma per leading index, e.g. [B] or [B, F] for [B, F, C, H, W])"
        )
    return sigma.to(x.dtype).reshape(tuple(sigma.shape) + (1,) * (x.dim() - sigma.dim()))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Forward process ``x_sigma = (1 - sigma) * x0 + sigma * noise``.

    Args:
        x0: clean sample, any shape ``[*lead, *rest]``, floating.
        noise: standard normal noise, same shape/dtype/device as ``x0``.
        sigma: a float, or a floating tensor of shape ``lead`` (a prefix of ``x0.shape``; e.g. ``[B, F]`` for
            latents ``[B, F, C, H, W]``). It is cast to ``x0.dtype`` as in the release.
    Returns:
        ``x_sigma``, same shape and dtype as ``x0``.
    """
    _check_pair(x0, noise, "x0", "noise")
    s = _sigma_like(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching regression target ``v = noise - x0`` (same shape as the inputs)."""
    _check_pair(x0, noise, "x0", "noise")
    return noise - x0


def _check_pair(a: torch.Tensor, b: torch.Tensor, na: str, nb: str, same_dtype: bool = True) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{na} and {nb} must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if not a.is_floating_point() or not b.is_floating_point():
        raise TypeError(f"{na} and {nb} must be floating tensors, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{na} shape {tuple(a.shape)} != {nb} shape {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{na} is on {a.device} but {nb} is on {b.device}")
    if same_dtype and a.dtype != b.dtype:
        raise TypeError(f"{na} dtype {a.dtype} != {nb} dtype {b.dtype}")


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


class TrainingDraw(NamedTuple):
    """One draw of training noise levels (all tensors of the requested shape, on the requested device).

    index: int64 index into the noise-first table (0 = sigma 1, pure noise).
    sigma: float32 noise level of that entry (``x = (1 - sigma) x0 + sigma noise``).
    timestep: float32 ``sigma * 1000``, what the model's time embedding receives.
    """

    index: torch.Tensor
    sigma: torch.Tensor
    timestep: torch.Tensor


class FlowMatchTrainingSchedule:
    """The release's training table: ``num_train_timesteps`` entries, noise first, shifted.

    ``sigmas[i]`` = shift_sigma(1 - i / T) for i = 0..T-1 (T = 1000: 1.0 down to 0.00498 at shift 5),
    ``timesteps = sigmas * T``, ``weights`` = the bell-shaped loss weight (mean 1, 0 at sigma = 1).
    All three are float32 ``[T]`` tensors on the CPU, computed with the release's float32 operations;
    lookups move them to the device of the index (cached per device).

    Args:
        num_train_timesteps: table length T (1000 in DreamZero).
        shift: timestep shift (5.0 in DreamZero).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0):
        T = _check_count("num_train_timesteps", num_train_timesteps)
        if T < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {T}")
        self.num_train_timesteps = T
        self.shift = _check_shift(shift)
        # noise-first grid 1, 1 - 1/T, ..., 1/T (the release's linspace(1, 0, T + 1)[:-1], float32)
        base = torch.linspace(1.0, 0.0, T + 1, dtype=torch.float32)[:-1]
        self.sigmas = shift_sigma(base, self.shift)
        self.timesteps = self.sigmas * T
        # bell centred on t = T/2 with width T, lifted to a minimum of 0 and scaled to mean 1 (sum = T)
        bell = torch.exp(-2.0 * ((self.timesteps - T / 2) / T) ** 2)
        bell = bell - bell.min()
        self.weights = bell * (T / bell.sum())
        self._per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # -- table lookups ------------------------------------------------------------------------------------
    def _tables(self, device: torch.device):
        device = torch.device(device)
        if device not in self._per_device:
            self._per_device[device] = (
                self.sigmas.to(device),
                self.timesteps.to(device),
                self.weights.to(device),
            )
        return self._per_device[device]

    def _check_index(self, index: torch.Tensor) -> torch.Tensor:
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be an integer tensor, got {type(index).__name__}")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got {index.dtype}")
        return index.long()

    def draw(self, index: torch.Tensor) -> TrainingDraw:
        """Look up sigma and timestep for table indices (int tensor, any shape, values in [0, T))."""
        index = self._check_index(index)
        sig, ts, _ = self._tables(index.device)
        return TrainingDraw(index, sig[index], ts[index])

    def index_for_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """Nearest table index for (float) timesteps, as the release's ``argmin |table - t|`` (ties -> the
        lower index). ``timestep``: tensor of any shape; returns int64 of the same shape and device."""
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be a tensor, got {type(timestep).__name__}")
        _, ts, _ = self._tables(timestep.device)
        T = self.num_train_timesteps
        asc = ts.flip(0).to(torch.float64)  # strictly increasing
        t = timestep.to(torch.float64)
        hi = torch.searchsorted(asc, t).clamp_(0, T - 1)
        lo = (hi - 1).clamp_(0, T - 1)
        # in the descending table, asc index hi is entry T-1-hi, which is the lower of the two: it wins ties
        take_hi = (asc[hi] - t).abs() <= (t - asc[lo]).abs()
        asc_idx = torch.where(take_hi, hi, lo)
        return (T - 1) - asc_idx

    def weight(self, index: torch.Tensor | None = None, *, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss weight per sample, float32, shape of ``index`` (or ``timestep``).

        Give exactly one of ``index`` (int tensor into the table) or ``timestep`` (float tensor; the nearest
        table entry is used, as the release's ``training_weight``).
        """
        if (index is None) == (timestep is None):
            raise ValueError("give exactly one of index= or timestep=")
        if index is None:
            index = self.index_for_timestep(timestep)
        index = self._check_index(index)
        _, _, w = self._tables(index.device)
        return w[index]

    # -- timestep draws -----------------------------------------------------------------------------------
    def sample_uniform(self, shape: Sequence[int], *, generator: torch.Generator | None = None,
                       device=None) -> TrainingDraw:
        """Base-model draw: indices uniform over [0, T) (``torch.randint`` as the release)."""
        idx = torch.randint(0, self.num_train_timesteps, tuple(shape), generator=generator,
                            device=device)
        return self.draw(idx)

    def sample_flash(self, shape: Sequence[int], *, a: float = 7.0, b: float = 1.0,
                     generator: torch.Generator | None = None, device=None) -> TrainingDraw:
        """DreamZero-Flash video draw: ``r ~ Beta(a, b)``, ``index = int((1 - r) * T)`` clamped to [0, T).

        With Beta(7, 1) the mean of r is 0.875 and about 95.5% of the draws have sigma > 0.9 (index <= 357
        at T = 1000, shift 5). The release's switch defaults to Beta(3, 1). The Beta sample is drawn in
        float32 exactly as ``torch.distributions.Beta`` does (same random stream for the same seed).
        """
        for name, c in (("a", a), ("b", b)):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
                raise ValueError(f"Beta parameter {name} must be a finite number > 0, got {c!r}")
        shape = tuple(shape)
        conc = torch.tensor([float(a), float(b)], dtype=torch.float32, device=device)
        r = torch._sample_dirichlet(conc.expand(shape + (2,)).contiguous(), generator=generator)[..., 0]
        T = self.num_train_timesteps
        idx = ((1.0 - r) * T).long().clamp_(0, T - 1)
        return self.draw(idx)

    # -- forward process ----------------------------------------------------------------------------------
    add_noise = staticmethod(add_noise)
    velocity_target = staticmethod(velocity_target)


# ----------------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------------


def _release_unshifted_grid(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """linspace(sigma_max, 0, N + 1)[:-1] in float64, with the release's sigma_max = float32(1 - 1/T)."""
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    return np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]


def inference_schedule(num_steps: int, shift: float = 5.0, *, num_train_timesteps: int = 1000,
                       device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas and timesteps of the release's ``FlowUniPCMultistepScheduler.set_timesteps(N, shift=shift)``.

    Returns:
        sigmas: float32 ``[N + 1]``, decreasing, the last one 0.
        timesteps: int64 ``[N]``, ``int(sigma * T)`` (truncated from the float64 sigmas, as the release).
    """
    n = _check_count("num_steps", num_steps)
    shift = _check_shift(shift)
    T = _check_count("num_train_timesteps", num_train_timesteps)
    s = shift_sigma(_release_unshifted_grid(n, T), shift)
    timesteps = torch.from_numpy((s * T).astype(np.int64))
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return sigmas.to(device), timesteps.to(device)


class _FlowSampler:
    """Common part of the samplers: the schedule and argument checks."""

    def __init__(self, num_steps: int = 16, shift: float = 5.0, *, num_train_timesteps: int = 1000,
                 device=None):
        self.num_train_timesteps = _check_count("num_train_timesteps", num_train_timesteps)
        self.device = device
        self.set_timesteps(num_steps, shift)

    def set_timesteps(self, num_steps: int, shift: float | None = None) -> None:
        """Rebuild the schedule (as the release's ``set_timesteps(num_steps, shift=shift)``) and reset."""
        shift = self.shift if shift is None else shift
        sigmas, timesteps = inference_schedule(num_steps, shift, num_train_timesteps=self.num_train_timesteps)
        s64 = sigmas.to(torch.float64)
        if not bool((s64[:-1] < 1.0).all()):
            raise ValueError(f"shift {shift} pushes the first sigma to 1.0 in float32; use a smaller shift")
        self.num_steps = int(num_steps)
        self.shift = float(shift)
        self._s64 = s64.tolist()  # host copy used to build coefficients (no device reads in step)
        self.sigmas = sigmas.to(self.device)  #: float32 [N + 1], last entry 0
        self.timesteps = timesteps.to(self.device)  #: int64 [N], sigma * 1000 truncated
        self._build()
        self.reset()

    def _build(self) -> None:
        pass

    def reset(self) -> None:
        """Forget the history, so the next call is ``step(..., step_index=0)``."""
        self._next = 0

    def _check_step(self, v: torch.Tensor, x: torch.Tensor, step_index) -> int:
        if isinstance(step_index, bool) or isinstance(step_index, torch.Tensor):
            raise TypeError("step_index must be a Python int (a tensor would force a device sync)")
        try:
            i = operator.index(step_index)
        except TypeError:
            raise TypeError(f"step_index must be an int, got {type(step_index).__name__}") from None
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step_index {i} out of range [0, {self.num_steps})")
        _check_pair(v, x, "v", "x", same_dtype=False)
        return i


class FlowEulerSampler(_FlowSampler):
    """First-order (Euler) flow sampler on the release's inference schedule.

    ``step(v, x, i)``: ``x + (sigmas[i + 1] - sigmas[i]) * v``. Stateless: any ``i`` in [0, N) may be given.

    Args:
        num_steps: N denoising steps (16 in DreamZero).
        shift: timestep shift (5.0).
        num_train_timesteps: T (1000).
        device: where ``sigmas`` / ``timesteps`` live (the step itself runs wherever ``x`` is).
    """

    def _build(self) -> None:
        s = self._s64
        self._dsigma = [s[i + 1] - s[i] for i in range(self.num_steps)]

    def step(self, v: torch.Tensor, x: torch.Tensor, step_index: int) -> torch.Tensor:
        """One Euler step. ``v``, ``x``: same shape ``[...]``, same device; returns ``x.dtype``, shape of ``x``."""
        i = self._check_step(v, x, step_index)
        self._next = i + 1
        return torch.add(x, v, alpha=self._dsigma[i]).to(x.dtype)


class _UniPCCoeffs(NamedTuple):
    # corrector (applied first, when present): x <- c_last * x_last + c_prev0 * m_prev0 + c_prev1 * m_prev1
    #                                                + c_now * m_now
    corr: tuple[float, float, float, float] | None
    # predictor: x_next = p_x * x + p_m0 * m_now + p_m1 * m_prev0
    pred: tuple[float, float, float]
    order: int


class FlowUniPCMultistepSampler(_FlowSampler):
    """UniPC multistep sampler for flow models, the release's ``FlowUniPCMultistepScheduler`` configuration:
    bh2, data prediction (``x0 = x - sigma * v``), ``solver_order`` 2 with warm-up, UniC corrector on
    (except after the steps listed in ``disable_corrector``), order 1 at the last step (lower_order_final;
    needed since the final sigma is 0), final sigma 0.

    Steps must be called in order 0, 1, ..., N-1 (the method is multistep); ``reset()`` starts over.
    The history (two x0 predictions and the last sample) is kept as tensors on ``x``'s device; step
    coefficients are host floats computed in float64 when the schedule is built, so ``step`` never reads
    device memory. The arithmetic runs in the promoted dtype of ``x`` and ``v`` and the result is cast to
    ``x.dtype`` (as the release).

    Args:
        num_steps: N (16 in DreamZero).
        shift: timestep shift (5.0).
        num_train_timesteps: T (1000).
        solver_order: 1 or 2 (the release uses 2).
        disable_corrector: step indices i after which the corrector is skipped (it then does not run at
            step i + 1), as in the release/diffusers; empty by default.
        device: where ``sigmas`` / ``timesteps`` live.
    """

    def __init__(self, num_steps: int = 16, shift: float = 5.0, *, num_train_timesteps: int = 1000,
                 solver_order: int = 2, disable_corrector: Sequence[int] = (), device=None):
        if solver_order not in (1, 2) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r}")
        self.solver_order = int(solver_order)
        self.disable_corrector = frozenset(operator.index(i) for i in disable_corrector)
        super().__init__(num_steps, shift, num_train_timesteps=num_train_timesteps, device=device)

    # -- coefficients -------------------------------------------------------------------------------------
    @staticmethod
    def _lam(s: float) -> float:
        """log-SNR of the flow path, lambda = log(alpha / sigma) with alpha = 1 - sigma (+inf at sigma 0)."""
        return math.inf if s == 0.0 else math.log1p(-s) - math.log(s)

    def _phi_terms(self, s_t: float, s_s0: float):
        """Terms of one update sigma_s0 -> sigma_t (data prediction, bh2), in float64.

        Returns (alpha_t, sigma_t / sigma_s0, h, h_phi_1 = expm1(-h), B(h) = expm1(-h), [b_1, b_2]) with
        h = lambda_t - lambda_s0 and b_k = k! * h_phi_{k+1}(-h) / B(h) (the right-hand side of the UniC
        system); b is None when sigma_t = 0 (h infinite; only the order-1 final predictor has that).
        """
        h = self._lam(s_t) - self._lam(s_s0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = h_phi_1
        bs = None
        if math.isfinite(hh):
            bs, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
            for k in (1, 2):
                bs.append(h_phi_k * fact / b_h)
                fact *= k + 1
                h_phi_k = h_phi_k / hh - 1.0 / fact
        return 1.0 - s_t, s_t / s_s0, h, h_phi_1, b_h, bs

    def _build(self) -> None:
        s, n, p = self._s64, self.num_steps, self.solver_order
        coeffs = []
        prev_order = None
        for i in range(n):
            # corrector for the sample at sigma_i, using the update sigma_{i-1} -> sigma_i of order prev_order
            corr = None
            if i > 0 and (i - 1) not in self.disable_corrector:
                q = prev_order
                alpha_t, ratio, h, h_phi_1, b_h, bs = self._phi_terms(s[i], s[i - 1])
                g = alpha_t * b_h
                base_m0 = -alpha_t * h_phi_1
                if q == 1:
                    rho_now = 0.5
                    corr = (ratio, base_m0 + g * rho_now, 0.0, -g * rho_now)
                else:
                    rk = (self._lam(s[i - 2]) - self._lam(s[i - 1])) / h
                    # solve [[1, 1], [rk, 1]] @ [rho_0, rho_1] = [b_1, b_2]
                    rho0 = (bs[0] - bs[1]) / (1.0 - rk)
                    rho1 = bs[0] - rho0
                    k0 = g * rho0 / rk  # weight of D1 = (m_prev1 - m_prev0) / rk
                    corr = (ratio, base_m0 + k0 + g * rho1, -k0, -g * rho1)
            # predictor sigma_i -> sigma_{i+1}
            order = min(p, n - i, i + 1)  # lower_order_final, warm-up
            alpha_t, ratio, h, h_phi_1, b_h, _ = self._phi_terms(s[i + 1], s[i])
            base_m0 = -alpha_t * h_phi_1
            if order == 1:
                pred = (ratio, base_m0, 0.0)
            else:
                rk = (self._lam(s[i - 1]) - self._lam(s[i])) / h
                k = alpha_t * b_h * 0.5 / rk  # rho_p = 1/2 for order 2
                pred = (ratio, base_m0 + k, -k)
            coeffs.append(_UniPCCoeffs(corr, pred, order))
            prev_order = order
        self._coeffs = coeffs

    def reset(self) -> None:
        """Forget the history, so the next call is ``step(..., step_index=0)``."""
        super().reset()
        self._m_prev0 = None  # x0 prediction of the previous step
        self._m_prev1 = None  # ... and of the one before
        self._x_last = None  # sample (after correction) the previous predictor started from

    # -- step ---------------------------------------------------------------------------------------------
    def step(self, v: torch.Tensor, x: torch.Tensor, step_index: int) -> torch.Tensor:
        """One UniPC step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``.

        Args:
            v: model velocity (flow) prediction at ``(x, timesteps[step_index])``, same shape as ``x``.
            x: current sample ``[...]``.
            step_index: Python int, must be the next index in order (0 after ``reset()``).
        Returns:
            The next sample, ``x.dtype``, shape of ``x``.
        """
        i = self._check_step(v, x, step_index)
        if i != self._next:
            raise ValueError(
                f"step_index {i} out of order: this multistep sampler expects {self._next} next "
                "(call reset() to start a new trajectory)"
            )
        if self._x_last is not None and (self._x_last.shape != x.shape or self._x_last.device != x.device):
            raise ValueError(
                f"x changed from {tuple(self._x_last.shape)} on {self._x_last.device} to {tuple(x.shape)} on "
                f"{x.device} within a trajectory (call reset())"
            )
        c = self._coeffs[i]
        sigma_i = self._s64[i]
        m_now = torch.add(x, v, alpha=-sigma_i)  # x0 = x - sigma * v
        if c.corr is not None:
            a, w0, w1, wn = c.corr
            xc = m_now * wn
            xc.add_(self._x_last, alpha=a).add_(self._m_prev0, alpha=w0)
            if w1 != 0.0:
                xc.add_(self._m_prev1, alpha=w1)
            x = xc.to(x.dtype)
        a, w0, w1 = c.pred
        out = m_now * w0
        out.add_(x, alpha=a)
        if c.order == 2:
            out.add_(self._m_prev0, alpha=w1)
        self._m_prev1, self._m_prev0, self._x_last = self._m_prev0, m_now, x
        self._next = i + 1
        return out.to(x.dtype)
