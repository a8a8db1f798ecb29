"""The 2-D UNet of Chaitanya et al. (NeurIPS 2020), split so its parts move between stages.

Architecture (supplement 1.1 and the official code's ``models.py``), for ``widths = (w1, ..., w6)``:

- ``encoder``: 6 blocks of two 3x3 conv-BN-ReLU; a 2x2 max-pool (stride 2) between blocks.
  Blocks 1..5 give the skip connections, block 6 the bottleneck at 1/32 of the input size.
- ``decoder.0`` .. ``decoder.4`` (= d_1 .. d_5): nearest-neighbour upsampling x2, a 2x2
  conv-BN-ReLU, concatenation with the skip of encoder block 6 - l, then 3x3 conv-BN-ReLU.
  d_1..d_4 have two 3x3 convs; d_5 has **one**, as in the official code (``dec_c1_a`` only).
  d_l outputs ``widths[5 - l]`` channels (64 at 48x48 for l = 3 and a 192 input).
- ``head``: two 3x3 conv-BN-ReLU at ``widths[0]`` and a final 3x3 conv to the class logits
  (no bias, no BN, no activation).

Convolutions before a BN carry no bias: BN subtracts the batch mean, so a bias there is a
parameter with zero gradient (the official code has one; it changes nothing but the count).

The state-dict prefixes (``encoder.``, ``decoder.{l-1}.``, ``head.``) are what the stages
exchange: stage 1 hands over ``encoder.*``, stage 2 ``encoder.*`` and ``decoder.0..l-1.*``
(:func:`partial_state_dict`, :func:`load_partial`). BN running statistics travel with the
weights so that a transferred block computes exactly the same function in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 64, 128, 128, 128)
NUM_DECODER_BLOCKS = 5
DOWNSAMPLING = 2**NUM_DECODER_BLOCKS  # five max-pools: inputs must be divisible by 32


class ConvBNReLU(nn.Sequential):
    """KxK convolution with TF-style 'same' padding, then BN and ReLU.

    For an even kernel (the 2x2 conv after upsampling) 'same' needs asymmetric padding; like
    TensorFlow we pad the extra row and column at the bottom and right, explicitly, so that the
    output size equals the input size for every kernel size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        total = kernel_size - 1
        before, after = total // 2, total - total // 2
        super().__init__(
            nn.ZeroPad2d((before, after, before, after)),
            nn.Conv2d(in_channels, out_channels, kernel_size, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels)
    )


class Encoder(nn.Module):
    """e: six double-conv blocks with a 2x2 max-pool between consecutive blocks."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.blocks = nn.ModuleList(
            _double_conv(chans[i], chans[i + 1]) for i in range(len(widths))
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return the bottleneck and the skips of blocks 1..5 (finest first)."""
        skips: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = block(x)
            skips.append(x)
        return skips.pop(), skips


class DecoderBlock(nn.Module):
    """One d_l block: upsample x2, 2x2 conv, concatenate the skip, ``n_convs`` 3x3 convs."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, n_convs: int
    ) -> None:
        super().__init__()
        self.up_conv = ConvBNReLU(in_channels, out_channels, kernel_size=2)
        convs = [ConvBNReLU(out_channels + skip_channels, out_channels)]
        convs += [ConvBNReLU(out_channels, out_channels) for _ in range(n_convs - 1)]
        self.convs = nn.Sequential(*convs)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up_conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return self.convs(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """UNet with named access to e, d_l and the segmentation head (see the module docstring).

    Args:
        in_channels: image channels (1 for the MR datasets).
        num_classes: output classes including background.
        widths: channels of the six encoder blocks; the decoder mirrors them.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        widths: Sequence[int] = DEFAULT_WIDTHS,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != NUM_DECODER_BLOCKS + 1:
            raise ValueError(f"widths must have {NUM_DECODER_BLOCKS + 1} entries, got {widths}")
        if in_channels < 1 or num_classes < 1 or min(widths) < 1:
            raise ValueError(
                f"in_channels, num_classes and widths must be positive, got "
                f"{in_channels}, {num_classes}, {widths}"
            )
        self.widths = widths
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder = Encoder(in_channels, widths)
        blocks = []
        for level in range(1, NUM_DECODER_BLOCKS + 1):
            below, out = widths[NUM_DECODER_BLOCKS + 1 - level], widths[NUM_DECODER_BLOCKS - level]
            n_convs = 1 if level == NUM_DECODER_BLOCKS else 2
            blocks.append(DecoderBlock(below, out, out, n_convs))
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            ConvBNReLU(widths[0], widths[0]),
            ConvBNReLU(widths[0], widths[0]),
            nn.Conv2d(widths[0], num_classes, kernel_size=3, padding=1, bias=False),
        )

    def decoder_channels(self, blocks: int) -> int:
        """Channels of the output of d_l, ``l = blocks`` in 1..5."""
        self._check_blocks(blocks)
        return self.widths[NUM_DECODER_BLOCKS - blocks]

    def bottleneck_features(self, height: int, width: int) -> int:
        """Flattened size of e's output for an input of ``height`` x ``width`` (g1's input)."""
        _check_size(height, width)
        return self.widths[-1] * (height // DOWNSAMPLING) * (width // DOWNSAMPLING)

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """e(x): the bottleneck (B, w6, H/32, W/32) and the five skips, finest first."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        _check_size(x.shape[2], x.shape[3])
        return self.encoder(x)

    def decode(
        self, bottleneck: Tensor, skips: Sequence[Tensor], blocks: int | None = None
    ) -> Tensor:
        """Feature map after the first ``blocks`` decoder blocks (all five if None)."""
        blocks = NUM_DECODER_BLOCKS if blocks is None else blocks
        self._check_blocks(blocks)
        x = bottleneck
        for level in range(1, blocks + 1):
            x = self.decoder[level - 1](x, skips[NUM_DECODER_BLOCKS - level])
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes, H, W)."""
        return self.head(self.decode(*self.encode(x)))

    @staticmethod
    def _check_blocks(blocks: int) -> None:
        if not 1 <= blocks <= NUM_DECODER_BLOCKS:
            raise ValueError(f"decoder blocks must be in 1..{NUM_DECODER_BLOCKS}, got {blocks}")


def _check_size(height: int, width: int) -> None:
    if height % DOWNSAMPLING or width % DOWNSAMPLING or height < 1 or width < 1:
        raise ValueError(
            f"input size {height}x{width} is not divisible by {DOWNSAMPLING} "
            f"(the UNet pools five times)"
        )


def partial_state_dict(
    model: UNet, encoder: bool = True, decoder_blocks: int = 0
) -> dict[str, Tensor]:
    """The weights (and BN buffers) of e and/or d_1..d_``decoder_blocks``, detached copies.

    Stage 1 saves ``partial_state_dict(m)``; stage 2 saves ``partial_state_dict(m, True, l)``.
    """
    if not 0 <= decoder_blocks <= NUM_DECODER_BLOCKS:
        raise ValueError(f"decoder_blocks must be in 0..{NUM_DECODER_BLOCKS}, got {decoder_blocks}")
    prefixes = (["encoder."] if encoder else []) + [f"decoder.{i}." for i in range(decoder_blocks)]
    return {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if key.startswith(tuple(prefixes))
    }


def load_partial(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Copy ``state`` into ``model``; every key must exist with the same shape.

    Returns the loaded keys (sorted), so the caller can log what was transferred and what
    starts from random weights. Raises ValueError listing unknown keys or shape mismatches,
    before anything is copied.
    """
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(
            f"keys not in the model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    mismatched = [
        f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(f"shape mismatch: {'; '.join(mismatched[:5])}")
    model.load_state_dict(dict(state), strict=False)
    return sorted(state)
