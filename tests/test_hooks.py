import pytest
import torch
from conftest import make_tiny_unet

from hmine.hooks import HSpaceHook, h_shape


@pytest.fixture(scope="module")
def unet():
    return make_tiny_unet().eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([500, 500])


@pytest.mark.parametrize("position", ["before", "middle", "after"])
def test_positions_record_h_of_the_bottleneck_shape(unet, position):
    # tiny U-Net: 16x16 input, one downsampling -> 8x8 bottleneck with 16 channels
    assert h_shape(unet, position) == (16, 8, 8)
    x, t = _inputs()
    with torch.no_grad(), HSpaceHook(unet, position) as hook:
        unet(x, t)
    assert len(hook.recorded) == 1 and hook.recorded[0].shape == (2, 16, 8, 8)


def test_recorded_h_equals_the_mid_block_output_of_a_plain_forward(unet):
    x, t = _inputs()
    seen = {}
    def remember_output(module, args, out):
        seen["h"] = out.clone()

    handle = unet.mid_block.register_forward_hook(remember_output)
    with torch.no_grad():
        eps_plain = unet(x, t).sample
    handle.remove()
    with torch.no_grad(), HSpaceHook(unet, "after") as hook:
        eps_hooked = unet(x, t).sample
    torch.testing.assert_close(hook.recorded[0], seen["h"], rtol=0, atol=0)
    torch.testing.assert_close(eps_hooked, eps_plain, rtol=0, atol=0)


def test_before_is_the_mid_block_input(unet):
    x, t = _inputs()
    seen = {}
    def remember_input(module, args):
        seen["h"] = args[0].clone()

    handle = unet.mid_block.register_forward_pre_hook(remember_input)
    with torch.no_grad(), HSpaceHook(unet, "before") as hook:
        unet(x, t)
    handle.remove()
    torch.testing.assert_close(hook.recorded[0], seen["h"], rtol=0, atol=0)


@pytest.mark.parametrize("position", ["before", "middle", "after"])
def test_delta_changes_eps_and_zero_delta_does_not(unet, position):
    x, t = _inputs()
    with torch.no_grad(), HSpaceHook(unet, position) as hook:
        eps = unet(x, t).sample
        hook.delta = torch.zeros(16, 8, 8)
        eps_zero = unet(x, t).sample
        hook.delta = torch.randn(16, 8, 8)
        eps_edit = unet(x, t).sample
    torch.testing.assert_close(eps_zero, eps, rtol=0, atol=0)
    assert (eps_edit - eps).abs().max() > 1e-3


def test_after_delta_is_added_to_h(unet):
    x, t = _inputs()
    delta = torch.randn(16, 8, 8)
    seen = []
    # an outer hook registered after ours sees what the up path receives
    with torch.no_grad(), HSpaceHook(unet, "after") as hook:
        hook.delta = delta
        handle = unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out.clone()) and None)
        unet(x, t)
        handle.remove()
    torch.testing.assert_close(seen[0], hook.recorded[0] + delta)


def test_replacement_makes_h_an_explicit_input(unet):
    x, t = _inputs()
    with torch.no_grad(), HSpaceHook(unet, "after") as hook:
        eps = unet(x, t).sample
        h = hook.recorded[0]
        hook.replacement = h.clone()
        eps_replaced = unet(x, t).sample
    torch.testing.assert_close(eps_replaced, eps, rtol=0, atol=0)


def test_hook_detaches_and_rejects_unknown_positions(unet):
    with pytest.raises(ValueError, match="h_position"):
        HSpaceHook(unet, "inside")
    hook = HSpaceHook(unet, "after").attach()
    hook.detach()
    x, t = _inputs()
    with torch.no_grad():
        unet(x, t)
    assert hook.recorded == []
