import pytest
import torch

from hmine.models import load_model
from hmine.sampling import Sampler, resolve_etas


@pytest.fixture(scope="module")
def model(tiny_pixel_model_dir):
    return load_model(str(tiny_pixel_model_dir))


@pytest.mark.parametrize("clip_sample", [False, True])
def test_step_matches_diffusers_ddim_step(model, clip_sample):
    from dataclasses import replace

    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler.config, clip_sample=clip_sample)
    sampler = Sampler(replace(model, scheduler=scheduler), num_inference_steps=5, eta=1.0)
    assert sampler.clip_sample == clip_sample
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (3 * torch.randn(2, 3, 16, 16, generator=g) for _ in range(3))
    for t in ddim.timesteps:
        for eta in (0.0, 0.5, 1.0):
            ours = sampler.step(eps, eps, int(t), x, eta, z)
            ref = ddim.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0, [1.0, 0.0, 0.5, 0.0]])
def test_sampling_is_batch_size_independent(model, eta):
    sampler = Sampler(model, num_inference_steps=4, eta=eta)
    seeds = list(range(8))
    batched = sampler.sample(seeds)
    singles = [sampler.sample([s]) for s in seeds]
    torch.testing.assert_close(batched.h, torch.cat([o.h for o in singles]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.images, torch.cat([o.images for o in singles]), rtol=1e-4, atol=1e-4)


def test_regeneration_with_zero_delta_reproduces_x0_exactly(model):
    sampler = Sampler(model, num_inference_steps=4, eta=1.0)
    first = sampler.sample([5, 6])
    again = sampler.sample([5, 6])
    zero = sampler.sample([5, 6], delta_h=torch.zeros_like(first.h[0]))
    zero_asym = sampler.sample([5, 6], delta_h=torch.zeros_like(first.h[0]), asymmetric=True)
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.images, zero.images)
    assert torch.equal(first.images, zero_asym.images)
    assert torch.equal(first.h, zero.h)


def test_delta_edits_the_image_and_only_on_edit_steps(model):
    sampler = Sampler(model, num_inference_steps=4, eta=0.0)
    base = sampler.sample([1])
    delta = 3.0 * torch.randn(4, *base.h.shape[2:], generator=torch.Generator().manual_seed(1))
    edited = sampler.sample([1], delta_h=delta)
    assert (edited.images - base.images).abs().max() > 1e-3
    late_only = sampler.sample([1], delta_h=delta, edit_steps=[False, False, False, True])
    # h of the unedited steps is untouched by an edit that comes later
    torch.testing.assert_close(late_only.h[:, :4], base.h[:, :4], rtol=0, atol=0)
    assert not torch.equal(late_only.images, edited.images)


def test_asymmetric_step_differs_from_symmetric(model):
    sampler = Sampler(model, num_inference_steps=4, eta=0.0)
    base = sampler.sample([2])
    delta = 3.0 * torch.randn(4, *base.h.shape[2:], generator=torch.Generator().manual_seed(2))
    sym = sampler.sample([2], delta_h=delta)
    asym = sampler.sample([2], delta_h=delta, asymmetric=True)
    assert (sym.images - asym.images).abs().max() > 1e-4


def test_eta_list_is_checked():
    assert resolve_etas(0.5, 3) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="one eta per step"):
        resolve_etas([0.0, 1.0], 3)
    for bad in (-1.0, 1.5, [0.0, 2.0]):  # above 1 the DDIM direction term would be complex
        with pytest.raises(ValueError, match="between 0 and 1"):
            resolve_etas(bad, 2)


def test_v_prediction_output_is_converted_to_eps(model):
    from dataclasses import replace

    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler.config, prediction_type="v_prediction")
    sampler = Sampler(replace(model, scheduler=scheduler), num_inference_steps=4)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    t = int(sampler.timesteps[1])
    a = float(sampler.scheduler.alphas_cumprod[t])
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    torch.testing.assert_close(sampler.eps(v, t, x_t), eps, rtol=1e-5, atol=1e-5)
    # with x_t fixed, d eps / d v = sqrt(a_t): the Jacobian stage rescales singular values by it
    assert sampler.eps_jacobian_scale(t) == pytest.approx(a**0.5)
    assert Sampler(model, num_inference_steps=4).eps_jacobian_scale(t) == 1.0
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(4)
    z = torch.randn(2, 3, 16, 16, generator=g)
    ours = sampler.step(sampler.eps(v, t, x_t), sampler.eps(v, t, x_t), t, x_t, 0.0, z)
    torch.testing.assert_close(ours, ddim.step(v, t, x_t, eta=0.0).prev_sample, rtol=1e-4, atol=1e-4)
