import numpy as np
import pytest
import torch
from torch import nn

from faceaudit.petct.unet import UPSTREAM_PARAMETERS, UNet, UpstreamUNet, build_model, count_parameters, model_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test here, and the module's fixtures, run torch on one thread."""


def _images(n, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, size, size),
                                                               dtype=np.float32))


def test_upstream_network_has_the_papers_200721_parameters():
    model = UpstreamUNet()
    assert count_parameters(model) == UPSTREAM_PARAMETERS == 200_721
    # Linear channel growth 16/32/48/64 and no bottleneck block: the last down conv
    # (48 -> 64) feeds the first transposed conv (64 -> 48) directly.
    assert [d.out_channels for d in model.downs] == [32, 48, 64]
    assert [u.out_channels for u in model.ups] == [48, 32, 16]
    assert len(model.enc_blocks) == len(model.dec_blocks) == 3
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_both_networks_map_images_to_same_shape_in_unit_range():
    x = _images(2, 48)
    for model in (UNet(base_channels=8), UpstreamUNet()):
        with torch.no_grad():
            y = model.eval()(x)
        assert y.shape == x.shape
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_untrained_residual_unet_is_the_identity():
    x = _images(3, 32)
    assert torch.equal(UNet(base_channels=8).eval()(x), x)


def test_standard_unet_has_working_batchnorm():
    model = UNet(base_channels=8)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 * (3 + 1 + 3)  # two per block: 3 encoder, bottleneck, 3 decoder
    assert all(m.affine and m.track_running_stats for m in norms)
    state = model.state_dict()
    assert any(key.endswith("running_mean") for key in state)
    model.train()
    model(_images(4, 32) * 0.5 + 0.3)
    assert not torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))


def test_upstream_output_depends_on_batch_composition_fixed_unet_does_not():
    torch.manual_seed(0)
    image, others = _images(1, 32, seed=1), _images(3, 32, seed=2)
    upstream = UpstreamUNet().eval()
    alone = upstream(image)
    in_batch = upstream(torch.cat([image, others]))[:1]
    assert (alone - in_batch).abs().max() > 1e-3  # upstream bug: batch stats even in eval()

    fixed = UNet(base_channels=8, residual=False)
    fixed.train()
    fixed(torch.cat([image, others]))  # give BN some running statistics
    fixed.eval()
    alone = fixed(image)
    in_batch = fixed(torch.cat([image, others]))[:1]
    torch.testing.assert_close(alone, in_batch, rtol=0, atol=1e-6)


def test_build_model_rebuilds_from_config():
    for model in (UNet(base_channels=8, depth=2, residual=False), UpstreamUNet(nb_filters=8)):
        config = model_config(model)
        again = build_model(config["arch"], **config["options"])
        again.load_state_dict(model.state_dict())
        assert count_parameters(again) == count_parameters(model)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("resnet")
