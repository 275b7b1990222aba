"""Tests of dreamzero.schedulers: the training table, the timestep draws and the inference samplers.

The UniPC sampler is checked step for step against diffusers' UniPCMultistepScheduler (flow sigmas, bh2,
order 2) fed the release's sigma grid; the release itself needs CUDA and more of its package, so it is not
imported here.
"""
import math

import numpy as np
import pytest
import torch

from dreamzero.schedulers import (
    FlowEulerSampler,
    FlowMatchTrainingSchedule,
    FlowUniPCMultistepSampler,
    add_noise,
    inference_schedule,
    shift_sigma,
    velocity_target,
)
from conftest import requires_cuda

try:  # optional extra ("encoders"); only the cross-checks need it
    import diffusers
except ImportError:  # pragma: no cover - exercised only where diffusers is absent
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers not installed (pip install .[encoders])")

T = 1000
SHIFT = 5.0


def _unshift(s, shift=SHIFT):
    """Inverse of shift_sigma."""
    return s / (shift - (shift - 1) * s)


def _release_grid(n):
    """The release's unshifted inference grid: linspace(float32(0.999), 0, n + 1)[:-1] in float64."""
    return np.linspace(float(np.float32(1 - 1 / T)), 0.0, n + 1)[:-1]


# ------------------------------------------------------------------------------------------------------
# Training table
# ------------------------------------------------------------------------------------------------------


def test_shift_formula():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    out = shift_sigma(s, SHIFT)
    torch.testing.assert_close(out, 5 * s / (1 + 4 * s), rtol=0, atol=0)
    assert out[0] == 0 and out[-1] == 1
    assert (out[1:-1] > s[1:-1]).all(), "shift > 1 must push sigmas towards noise"
    assert (out.diff() > 0).all()
    torch.testing.assert_close(shift_sigma(s, 1.0), s, rtol=0, atol=0)
    torch.testing.assert_close(_unshift(out), s, rtol=0, atol=1e-15)


def test_training_table_endpoints_and_monotone():
    sch = FlowMatchTrainingSchedule()
    for t in (sch.sigmas, sch.timesteps, sch.weights):
        assert t.shape == (T,) and t.dtype == torch.float32
    assert sch.sigmas[0].item() == 1.0, "index 0 is pure noise"
    last = shift_sigma(1.0 / T, SHIFT)  # unshifted grid ends at 1/T (release: linspace(1, 0, T + 1)[:-1])
    assert sch.sigmas[-1].item() == pytest.approx(last, rel=1e-6)
    assert 0.0049 < sch.sigmas[-1].item() < 0.0050
    assert (sch.sigmas.diff() < 0).all(), "table must be strictly decreasing (noise first)"
    torch.testing.assert_close(sch.timesteps, sch.sigmas * T, rtol=0, atol=0)


def test_training_table_matches_shift_formula_in_float64():
    for shift in (SHIFT, 3.0, 1.0):
        sch = FlowMatchTrainingSchedule(shift=shift)
        base = 1.0 - torch.arange(T, dtype=torch.float64) / T
        ref = shift * base / (1 + (shift - 1) * base)
        torch.testing.assert_close(sch.sigmas.double(), ref, rtol=0, atol=2e-7)


def test_training_weights_normalized_as_release():
    sch = FlowMatchTrainingSchedule()
    t = sch.timesteps.double()
    y = torch.exp(-2 * ((t - T / 2) / T) ** 2)
    y = y - y.min()
    ref = y * (T / y.sum())
    torch.testing.assert_close(sch.weights.double(), ref, rtol=1e-5, atol=1e-6)
    assert sch.weights.double().sum().item() == pytest.approx(T, rel=1e-5), "weights sum to T (mean 1)"
    assert sch.weights.min().item() == 0.0 and sch.weights.argmin().item() == 0, "0 at sigma = 1"
    assert (sch.weights >= 0).all()
    peak = sch.timesteps[sch.weights.argmax()].item()
    assert abs(peak - T / 2) < 1.0, "the bell is centred on t = 500"
    # the bell's height over its floor: (1 - e^-0.5) against the mean of the lifted bell
    assert 2.0 < sch.weights.max().item() < 2.2


def test_weight_lookup_by_index_and_nearest_timestep():
    sch = FlowMatchTrainingSchedule()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, T, (4, 33), generator=g)
    torch.testing.assert_close(sch.weight(idx), sch.weights[idx], rtol=0, atol=0)
    torch.testing.assert_close(sch.weight(timestep=sch.timesteps[idx]), sch.weights[idx], rtol=0, atol=0)
    # arbitrary timesteps (also outside the table's range) and exact midpoints (ties -> lower index)
    t = torch.cat([
        torch.rand(3001, generator=g, dtype=torch.float64) * 1020 - 10,
        (sch.timesteps.double()[:-1] + sch.timesteps.double()[1:]) / 2,
        torch.tensor([-5.0, 0.0, 1000.0, 2000.0], dtype=torch.float64),
    ])
    brute = (sch.timesteps.double()[:, None] - t[None, :]).abs().argmin(dim=0)
    assert torch.equal(sch.index_for_timestep(t), brute)
    torch.testing.assert_close(sch.weight(timestep=t), sch.weights[brute], rtol=0, atol=0)


def test_add_noise_and_velocity_target():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 4, 5, 7, generator=g, dtype=torch.float64)
    nz = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = torch.rand(2, 3, generator=g, dtype=torch.float64)
    xt = add_noise(x0, nz, sigma)
    s = sigma[:, :, None, None, None]
    torch.testing.assert_close(xt, (1 - s) * x0 + s * nz, rtol=0, atol=1e-15)
    torch.testing.assert_close(add_noise(x0, nz, 0.0), x0, rtol=0, atol=0)
    torch.testing.assert_close(add_noise(x0, nz, 1.0), nz, rtol=0, atol=0)
    torch.testing.assert_close(add_noise(x0, nz, torch.tensor(0.25, dtype=torch.float64)),
                               0.75 * x0 + 0.25 * nz, rtol=0, atol=1e-15)
    # the target is the sigma-derivative of the path
    v = velocity_target(x0, nz)
    torch.testing.assert_close(add_noise(x0, nz, sigma + 0.125) - xt, 0.125 * v, rtol=0, atol=1e-14)
    torch.testing.assert_close(v, nz - x0, rtol=0, atol=0)
    # the schedule exposes the same functions; sigma from a draw is cast to the sample dtype
    sch = FlowMatchTrainingSchedule()
    d = sch.draw(torch.tensor([[0, 999, 500], [1, 2, 3]]))
    x32 = x0.float()
    out = sch.add_noise(x32, nz.float(), d.sigma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], nz[0, 0].float(), rtol=0, atol=0)


def test_add_noise_bad_input():
    x0 = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="prefix"):
        add_noise(x0, torch.randn_like(x0), torch.rand(3))
    with pytest.raises(ValueError, match="shape"):
        add_noise(x0, torch.randn(2, 3, 5), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        add_noise(x0, torch.randn_like(x0, dtype=torch.float64), 0.5)
    with pytest.raises(TypeError, match="floating"):
        add_noise(x0, torch.randn_like(x0), torch.tensor([1, 0]))
    with pytest.raises(TypeError):
        velocity_target(x0, np.zeros((2, 3, 4)))


def test_uniform_draw_is_uniform():
    sch = FlowMatchTrainingSchedule()
    n = 200_000
    d = sch.sample_uniform((n,), generator=torch.Generator().manual_seed(3))
    assert d.index.dtype == torch.int64 and d.index.min() >= 0 and d.index.max() < T
    assert torch.equal(d.sigma, sch.sigmas[d.index]) and torch.equal(d.timestep, sch.timesteps[d.index])
    se = math.sqrt((T * T - 1) / 12 / n)
    assert abs(d.index.double().mean().item() - (T - 1) / 2) < 5 * se
    counts = torch.bincount(d.index // 100, minlength=10).double()  # 10 bins of 100 entries
    chi2 = ((counts - n / 10) ** 2 / (n / 10)).sum().item()
    assert chi2 < 35.0, f"chi-square {chi2:.1f} on 9 dof: not uniform"  # p ~ 7e-5 for a uniform draw
    assert d.timestep.shape == (n,)


@pytest.mark.parametrize("a", [7.0, 3.0])
def test_flash_draw_statistics(a):
    sch = FlowMatchTrainingSchedule()
    n = 200_000
    d = sch.sample_flash((n,), a=a, b=1.0, generator=torch.Generator().manual_seed(4))
    assert d.index.min() >= 0 and d.index.max() < T
    # r = 1 - index / T up to the truncation (bias 1/(2T)): mean a / (a + 1)
    r = 1.0 - (d.index.double() + 0.5) / T
    mean, sd = a / (a + 1), math.sqrt(a / ((a + 1) ** 2 * (a + 2)))
    assert abs(r.mean().item() - mean) < 6 * sd / math.sqrt(n) + 1e-4
    # P(sigma > 0.9): the first k table entries; index <= k-1 <=> r > 1 - k/T, and P(r > x) = 1 - x^a
    k = int((sch.sigmas > 0.9).sum())
    assert (sch.sigmas[:k] > 0.9).all()
    p = 1.0 - (1.0 - k / T) ** a
    frac = (d.sigma > 0.9).double().mean().item()
    assert abs(frac - p) < 6 * math.sqrt(p * (1 - p) / n)
    if a == 7.0:
        assert mean == 0.875 and k == 358
        assert frac > 0.94, "Flash must put most video draws at the noisiest entries"
        assert d.sigma.double().mean().item() > 0.9


def test_flash_direction_and_release_stream():
    """Same seed, same draws as the release's torch.distributions.Beta(a, b) path; the noisy end is index 0."""
    sch = FlowMatchTrainingSchedule()
    torch.manual_seed(11)
    d = sch.sample_flash((7, 513))
    torch.manual_seed(11)
    r = torch.distributions.Beta(7.0, 1.0).sample((7, 513))
    assert torch.equal(d.index, ((1.0 - r) * T).long().clamp(0, T - 1))
    uni = sch.sample_uniform((20_000,), generator=torch.Generator().manual_seed(5))
    flash = sch.sample_flash((20_000,), generator=torch.Generator().manual_seed(5))
    assert flash.sigma.mean() > uni.sigma.mean() + 0.2


def test_training_bad_input():
    sch = FlowMatchTrainingSchedule()
    with pytest.raises(ValueError, match="num_train_timesteps"):
        FlowMatchTrainingSchedule(num_train_timesteps=0)
    with pytest.raises(ValueError, match="shift"):
        FlowMatchTrainingSchedule(shift=-1.0)
    with pytest.raises(ValueError, match="Beta"):
        sch.sample_flash((3,), a=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        sch.weight()
    with pytest.raises(ValueError, match="exactly one"):
        sch.weight(torch.tensor([1]), timestep=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="integer"):
        sch.weight(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="integer"):
        sch.draw(torch.tensor([True]))


# ------------------------------------------------------------------------------------------------------
# Inference schedule
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 16, 50])
def test_inference_schedule_as_release(n):
    sigmas, timesteps = inference_schedule(n, SHIFT)
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
    assert timesteps.shape == (n,) and timesteps.dtype == torch.int64
    assert sigmas[-1].item() == 0.0 and (sigmas.diff() < 0).all()
    grid = _release_grid(n)
    shifted = SHIFT * grid / (1 + (SHIFT - 1) * grid)
    assert torch.equal(sigmas, torch.from_numpy(np.append(shifted, 0.0).astype(np.float32)))
    assert torch.equal(timesteps, torch.from_numpy((shifted * T).astype(np.int64)))
    assert sigmas[0].item() == pytest.approx(shift_sigma(0.999, SHIFT), rel=1e-7)  # 0.99980, not 1
    for cls in (FlowEulerSampler, FlowUniPCMultistepSampler):
        smp = cls(n, SHIFT)
        assert torch.equal(smp.sigmas, sigmas) and torch.equal(smp.timesteps, timesteps)


def test_inference_schedule_16_steps_pinned():
    """The release's 16-step timesteps (read off the release's set_timesteps(16, shift=5.0))."""
    _, ts = inference_schedule(16, 5.0)
    assert ts.tolist() == [999, 986, 972, 955, 937, 916, 892, 865, 833, 795, 749, 694, 624, 535, 416, 249]


def _diffusers_unipc(n, solver_order=2, disable_corrector=(), grid=None):
    sch = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=T, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
        solver_order=solver_order, solver_type="bh2", predict_x0=True, lower_order_final=True,
        final_sigmas_type="zero", disable_corrector=list(disable_corrector),
    )
    if grid is None:
        sch.set_timesteps(n)
    else:
        sch.set_timesteps(sigmas=grid)
    return sch


@needs_diffusers
def test_diffusers_default_grid_is_one_step_above_release():
    """Documented difference: diffusers' flow grid is linspace(1, 1/T, N + 1)[:-1], the release's
    linspace(0.999, 0, N + 1)[:-1]: 1/T apart before the shift (and diffusers clamps 1 to 1 - 1e-6)."""
    n = 16
    ref = _diffusers_unipc(n)
    ours = FlowUniPCMultistepSampler(n)
    gap = _unshift(ref.sigmas[:-1].double()) - _unshift(ours.sigmas[:-1].double())
    torch.testing.assert_close(gap[1:], torch.full((n - 1,), 1 / T, dtype=torch.float64), rtol=0, atol=1e-6)
    assert ref.sigmas[0].item() == pytest.approx(1 - 1e-6, abs=1e-7)


def _run_pair(ours, ref, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    xr = x.clone()
    out = []
    for i in range(ours.num_steps):
        v = torch.randn(shape, generator=g, dtype=dtype)
        xr = ref.step(v, ref.timesteps[i], xr).prev_sample
        x = ours.step(v, x, i)
        out.append((x, xr))
    return out


@needs_diffusers
@pytest.mark.parametrize("n", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("order,disable", [(2, ()), (2, (0, 2)), (1, ())])
def test_unipc_matches_diffusers_fp64(n, order, disable):
    ours = FlowUniPCMultistepSampler(n, SHIFT, solver_order=order, disable_corrector=disable)
    ref = _diffusers_unipc(n, order, disable, grid=_release_grid(n))
    assert torch.equal(ref.sigmas, ours.sigmas) and torch.equal(ref.timesteps, ours.timesteps)
    ref.sigmas = ref.sigmas.double()  # let diffusers compute its coefficients in float64 too
    for i, (x, xr) in enumerate(_run_pair(ours, ref, (2, 4, 5, 3), torch.float64, seed=100 + n)):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, xr, rtol=1e-12, atol=1e-12, msg=f"step {i}")


@needs_diffusers
def test_unipc_matches_diffusers_float32_sigmas():
    """diffusers as shipped (float32 coefficients) against ours (float64 coefficients): fp32 rounding apart."""
    n = 16
    ours = FlowUniPCMultistepSampler(n, SHIFT)
    ref = _diffusers_unipc(n, grid=_release_grid(n))
    for x, xr in _run_pair(ours, ref, (3, 16, 9), torch.float32, seed=7):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, xr, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Samplers on known flows
# ------------------------------------------------------------------------------------------------------


def test_euler_integrates_constant_velocity_exactly():
    n = 16
    smp = FlowEulerSampler(n, SHIFT)
    g = torch.Generator().manual_seed(8)
    x1 = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    v = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    s = smp.sigmas.double()
    x = x1
    for i in range(n):
        x = smp.step(v, x, i)
        torch.testing.assert_close(x, x1 - (s[0] - s[i + 1]) * v, rtol=0, atol=1e-13)
    # the release grid starts at sigma 0.9998, so the endpoint is x1 - sigma_0 * v (= x1 - v up to 2e-4)
    torch.testing.assert_close(x, x1 - s[0] * v, rtol=0, atol=1e-13)
    assert (x - (x1 - v)).abs().max() <= (1 - s[0]) * v.abs().max() + 1e-13


def _gaussian_problem(d=64, seed=9):
    """x0 ~ N(mu, diag(s^2)) per coordinate; exact velocity, exact flow x(sigma) and its posterior mean."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    s = torch.rand(d, generator=g, dtype=torch.float64) * 1.5 + 0.1
    z = torch.randn(d, generator=g, dtype=torch.float64)

    def post_mean(x, sig):  # E[x0 | x_sigma = x]
        var = (1 - sig) ** 2 * s**2 + sig**2
        return mu + (1 - sig) * s**2 / var * (x - (1 - sig) * mu)

    def velocity(x, sig):  # E[noise - x0 | x_sigma = x]
        return (x - post_mean(x, sig)) / sig

    def flow(sig):  # the ODE solution through noise z at sigma = 1
        return (1 - sig) * mu + torch.sqrt((1 - sig) ** 2 * s**2 + sig**2) * z

    return mu, s, z, velocity, flow


def _integrate(smp, velocity, x):
    s = smp.sigmas.double().tolist()
    for i in range(smp.num_steps):
        x = smp.step(velocity(x, s[i]), x, i)
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 16])
def test_samplers_exact_on_point_mass(n):
    """Data = one point mu: straight paths, x0-prediction constant; both samplers land on mu exactly."""
    g = torch.Generator().manual_seed(10)
    mu = torch.randn(4, 9, generator=g, dtype=torch.float64)
    for cls in (FlowEulerSampler, FlowUniPCMultistepSampler):
        smp = cls(n, SHIFT)
        x1 = smp.sigmas[0].double() * torch.randn(mu.shape, generator=g, dtype=torch.float64) \
            + (1 - smp.sigmas[0].double()) * mu
        out = _integrate(smp, lambda x, sig: (x - mu) / sig, x1)
        torch.testing.assert_close(out, mu, rtol=0, atol=1e-12)


def test_unipc_reaches_exact_x0_on_gaussian():
    """Linear-Gaussian data with the exact velocity: UniPC converges to the exact ODE endpoint mu + s*z,
    fast, and well ahead of Euler at the same step count."""
    mu, s, z, velocity, flow = _gaussian_problem()
    exact_x0 = mu + s * z
    errs = {}
    for n in (16, 32, 64, 128):
        for cls in (FlowEulerSampler, FlowUniPCMultistepSampler):
            smp = cls(n, SHIFT)
            out = _integrate(smp, velocity, flow(smp.sigmas[0].double()))
            errs[cls.__name__, n] = (out - exact_x0).abs().max().item()
    uni = [errs["FlowUniPCMultistepSampler", n] for n in (16, 32, 64, 128)]
    eul = [errs["FlowEulerSampler", n] for n in (16, 32, 64, 128)]
    # the final order-1 jump to the posterior mean errs by O(sigma_{N-1}^2): ratio -> 4 per doubling
    assert all(b < a / 1.8 for a, b in zip(uni, uni[1:])), f"UniPC does not converge: {uni}"
    assert uni[-1] < uni[-2] / 3, f"UniPC not second order at 64 -> 128 steps: {uni}"
    assert uni[-1] < 1e-2, f"UniPC at 128 steps is {uni[-1]:.3g} from the exact x0"
    assert all(u < e / 1.5 for u, e in zip(uni, eul)), f"UniPC {uni} not ahead of Euler {eul}"
    assert uni[-1] < eul[-1] / 8, f"UniPC {uni} vs Euler {eul}: Euler is first order, UniPC second"


def test_unipc_tracks_exact_flow_at_16_steps():
    """At the DreamZero setting (16 steps, shift 5) every intermediate sample stays on the exact flow
    (to 1e-2 before the last two steps, whose sigma gaps are the largest); the last step returns the
    posterior mean, as the release's order-1 final step does."""
    mu, s, z, velocity, flow = _gaussian_problem()
    n = 16
    smp = FlowUniPCMultistepSampler(n, SHIFT)
    eul = FlowEulerSampler(n, SHIFT)
    sig = smp.sigmas.double().tolist()
    x = xe = flow(sig[0])
    for i in range(n - 1):
        x = smp.step(velocity(x, sig[i]), x, i)
        xe = eul.step(velocity(xe, sig[i]), xe, i)
        err, err_e = (x - flow(sig[i + 1])).abs().max().item(), (xe - flow(sig[i + 1])).abs().max().item()
        if i < n - 3:
            assert err < 1e-2, f"step {i}: {err:.3g} off the exact flow"
        if i >= 1:  # step 0 is first order in both (multistep warm-up); step 1 adds the corrector
            assert err < (err_e if i == 1 else err_e / 3), f"step {i}: UniPC {err:.3g} vs Euler {err_e:.3g}"
    v = velocity(x, sig[n - 1])
    torch.testing.assert_close(smp.step(v, x, n - 1), x - sig[n - 1] * v, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------------
# Devices, dtypes, state, bad input
# ------------------------------------------------------------------------------------------------------


def test_unipc_step_never_reads_device_memory():
    """A whole trajectory on the meta device (no data at all): any .item()/host read would raise."""
    smp = FlowUniPCMultistepSampler(16, SHIFT)
    x = torch.empty(2, 1785, 16, device="meta", dtype=torch.bfloat16)
    for i in range(16):
        x = smp.step(torch.empty_like(x), x, i)
    assert x.device.type == "meta" and x.dtype == torch.bfloat16 and x.shape == (2, 1785, 16)


def test_low_precision_keeps_dtype_and_tracks_fp64():
    n = 16
    g = torch.Generator().manual_seed(12)
    x64 = torch.randn(8, 32, generator=g, dtype=torch.float64)
    vs = [torch.randn(8, 32, generator=g, dtype=torch.float64) * 0.3 for _ in range(n)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        a, b = FlowUniPCMultistepSampler(n), FlowUniPCMultistepSampler(n)
        x, xl = x64, x64.to(dtype)
        for i, v in enumerate(vs):
            x = a.step(v, x, i)
            xl = b.step(v.to(dtype), xl, i)
            assert xl.dtype == dtype
        assert (xl.double() - x).abs().max().item() < tol


def test_reset_restarts_the_trajectory():
    n = 5
    smp = FlowUniPCMultistepSampler(n)
    g = torch.Generator().manual_seed(13)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    vs = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(n)]

    def run():
        x = x0
        for i, v in enumerate(vs):
            x = smp.step(v, x, i)
        return x

    first = run()
    with pytest.raises(ValueError, match="out of order"):
        smp.step(vs[0], x0, 0)
    smp.reset()
    assert torch.equal(run(), first)
    smp.set_timesteps(3, shift=3.0)  # rebuilding the schedule resets too
    assert smp.num_steps == 3 and smp.timesteps.shape == (3,)
    smp.step(vs[0], x0, 0)


def test_sampler_bad_input():
    for cls in (FlowEulerSampler, FlowUniPCMultistepSampler):
        with pytest.raises(ValueError, match="num_steps"):
            cls(0)
        with pytest.raises(TypeError, match="num_steps"):
            cls(2.5)
        with pytest.raises(ValueError, match="shift"):
            cls(4, 0.0)
        with pytest.raises(ValueError, match="first sigma"):
            cls(4, 1e9)
        smp = cls(4)
        x = torch.randn(2, 3)
        for bad in (4, -1):
            with pytest.raises(ValueError, match="out of range"):
                smp.step(torch.randn(2, 3), x, bad)
        with pytest.raises(TypeError, match="step_index"):
            smp.step(torch.randn(2, 3), x, torch.tensor(0))
        with pytest.raises(ValueError, match="shape"):
            smp.step(torch.randn(2, 4), x, 0)
        with pytest.raises(TypeError, match="floating"):
            smp.step(torch.ones(2, 3, dtype=torch.int64), x, 0)
    smp = FlowUniPCMultistepSampler(4)
    with pytest.raises(ValueError, match="out of order"):
        smp.step(torch.randn(2, 3), torch.randn(2, 3), 1)
    smp.step(torch.randn(2, 3), torch.randn(2, 3), 0)
    with pytest.raises(ValueError, match="reset"):
        smp.step(torch.randn(5, 3), torch.randn(5, 3), 1)
    with pytest.raises(ValueError, match="solver_order"):
        FlowUniPCMultistepSampler(4, solver_order=3)


@requires_cuda
def test_samplers_on_cuda_match_cpu():
    n = 16
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 1785, 16, generator=g, dtype=torch.float64)
    vs = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(n)]
    for cls in (FlowEulerSampler, FlowUniPCMultistepSampler):
        cpu, gpu = cls(n), cls(n, device="cuda")
        assert gpu.timesteps.device.type == "cuda" and gpu.timesteps.dtype == torch.int64
        a, b = x, x.cuda()
        for i, v in enumerate(vs):
            a = cpu.step(v, a, i)
            b = gpu.step(v.cuda(), b, i)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)
    sch = FlowMatchTrainingSchedule()
    d = sch.sample_flash((4096,), device="cuda")
    assert d.sigma.device.type == "cuda" and (d.sigma > 0.9).float().mean() > 0.9
    torch.testing.assert_close(sch.weight(d.index), sch.weights.cuda()[d.index], rtol=0, atol=0)
