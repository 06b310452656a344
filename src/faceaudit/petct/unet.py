"""Denoising networks for PET -> CT face renders.

Two architectures, both mapping a (N, 1, H, W) float tensor in [0, 1] to the same shape
in [0, 1]; H and W must be multiples of 8 (three 2x downsamplings):

* :class:`UNet` (``arch="unet"``, the default): a standard U-Net whose BatchNorm layers are
  real ``nn.BatchNorm2d`` modules (learned affine, running statistics), so an image's output
  in ``eval()`` does not depend on the other images of its batch. Channels double per level
  (16/32/64 + a 128-channel bottleneck block by default). It predicts a residual added to the
  input, with a zero-initialised head, so an untrained network is the identity: training
  starts from "denoised = raw PET" and the best-by-validation model can only improve on it.
* :class:`UpstreamUNet` (``arch="upstream"``): the pet-deanonymization network reproduced
  exactly for faithful reproduction (nb_levels=4, nb_filters=16, 200,721 parameters):
  channels grow linearly 16/32/48/64, strided 2x2 convolutions downsample, there is no
  conv block at the bottleneck, and its BatchNorm is built inside ``forward``, which means
  no learned affine and batch statistics at train AND test time (outputs depend on batch
  composition). Kept only to reproduce the paper; see reference/upstream_pipelines.md A2, A7.4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("unet", "upstream")

#: Downsampling factor of both networks: H and W must be multiples of this.
SPATIAL_MULTIPLE = 8

UPSTREAM_PARAMETERS = 200_721


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------
# Upstream network (faithful reproduction)
# ----------------------------------------------------------------------------------------

def _batch_stats_norm(x: torch.Tensor) -> torch.Tensor:
    """What upstream's ``nn.BatchNorm2d(c)(x)`` built inside forward does: a fresh module is in
    training mode with weight 1 and bias 0, so it normalises with the current batch's
    statistics whatever the outer model's mode is."""
    return F.batch_norm(x, None, None, weight=None, bias=None, training=True,
                        momentum=0.1, eps=1e-5)


class UpstreamBlock(nn.Module):
    """conv3x3 (same) -> batch-stat norm -> LeakyReLU(0.01), twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding="same")
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(_batch_stats_norm(self.conv1(x)), 0.01)
        return F.leaky_relu(_batch_stats_norm(self.conv2(x)), 0.01)


class UpstreamUNet(nn.Module):
    """The upstream denoiser (``UNET(nb_levels=4, nb_filters=16, batch_norm=True)``).

    Input and output (N, 1, H, W) in [0, 1] (sigmoid head); H, W multiples of 8.
    """

    def __init__(self, nb_levels: int = 4, nb_filters: int = 16, in_channels: int = 1,
                 out_channels: int = 1) -> None:
        super().__init__()
        if nb_levels < 2:
            raise ValueError(f"nb_levels must be >= 2, got {nb_levels}")
        self.nb_levels = nb_levels
        self.nb_filters = nb_filters
        widths = [nb_filters * (level + 1) for level in range(nb_levels)]  # 16/32/48/64
        self.enc_blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        previous = in_channels
        for level in range(nb_levels - 1):
            self.enc_blocks.append(UpstreamBlock(previous, widths[level]))
            self.downs.append(nn.Conv2d(widths[level], widths[level + 1], kernel_size=2, stride=2))
            previous = widths[level + 1]
        # No block at the bottleneck: the last down conv feeds the first up conv directly.
        self.ups = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for level in range(nb_levels - 1, 0, -1):
            self.ups.append(nn.ConvTranspose2d(widths[level], widths[level - 1], kernel_size=2,
                                               stride=2))
            self.dec_blocks.append(UpstreamBlock(2 * widths[level - 1], widths[level - 1]))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block, down in zip(self.enc_blocks, self.downs):
            x = block(x)
            skips.append(x)
            x = down(x)
        for up, block in zip(self.ups, self.dec_blocks):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return torch.sigmoid(self.head(x))


# ----------------------------------------------------------------------------------------
# Standard U-Net with working BatchNorm
# ----------------------------------------------------------------------------------------

class ConvBlock(nn.Sequential):
    """(conv3x3 -> BatchNorm2d -> ReLU) x 2; the conv bias is dropped because BN's shift replaces it."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Standard U-Net (max-pool down, transposed-conv up, skip concatenation, bottleneck block).

    ``base_channels`` c gives widths c, 2c, 4c and an 8c bottleneck over ``depth`` = 3
    downsamplings. With ``residual=True`` the 1x1 head (zero-initialised) predicts a
    correction added to the input and the result is clamped to [0, 1]; otherwise the head
    is followed by a sigmoid as upstream.

    Input and output (N, 1, H, W) float in [0, 1]; H, W multiples of 2**depth.
    """

    def __init__(self, base_channels: int = 16, depth: int = 3, in_channels: int = 1,
                 out_channels: int = 1, residual: bool = True) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError("a residual U-Net needs in_channels == out_channels, got "
                             f"{in_channels} and {out_channels}")
        self.base_channels = base_channels
        self.depth = depth
        self.residual = residual
        widths = [base_channels * 2 ** level for level in range(depth + 1)]
        self.enc_blocks = nn.ModuleList()
        previous = in_channels
        for level in range(depth):
            self.enc_blocks.append(ConvBlock(previous, widths[level]))
            previous = widths[level]
        self.bottleneck = ConvBlock(widths[depth - 1], widths[depth])
        self.ups = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for level in range(depth, 0, -1):
            self.ups.append(nn.ConvTranspose2d(widths[level], widths[level - 1], kernel_size=2,
                                               stride=2))
            self.dec_blocks.append(ConvBlock(2 * widths[level - 1], widths[level - 1]))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        if residual:
            # Start as the identity map so that early training cannot make the input worse.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x
        skips = []
        for block in self.enc_blocks:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, block in zip(self.ups, self.dec_blocks):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        x = self.head(x)
        if self.residual:
            return torch.clamp(inputs + x, 0.0, 1.0)
        return torch.sigmoid(x)


def build_model(arch: str, **options) -> nn.Module:
    """``arch`` in ARCHS; ``options`` are the constructor's keyword arguments."""
    if arch == "unet":
        return UNet(**options)
    if arch == "upstream":
        return UpstreamUNet(**options)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def model_config(model: nn.Module) -> dict:
    """The constructor arguments that rebuild ``model`` with :func:`build_model`."""
    if isinstance(model, UNet):
        return {"arch": "unet", "options": {"base_channels": model.base_channels,
                                            "depth": model.depth, "residual": model.residual}}
    if isinstance(model, UpstreamUNet):
        return {"arch": "upstream", "options": {"nb_levels": model.nb_levels,
                                                "nb_filters": model.nb_filters}}
    raise TypeError(f"unknown model type {type(model).__name__}")
