"""UNet shapes, state-dict layout and the weight transfer between the three stages."""

from __future__ import annotations

import pytest
import torch

from contraseg.models.unet import UNet, load_partial, partial_state_dict

SMALL = (4, 4, 8, 8, 8, 8)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 96), (160, 160)])
def test_shapes_for_any_size_divisible_by_32(height: int, width: int):
    model = UNet(in_channels=2, num_classes=3, widths=SMALL).eval()
    x = torch.randn(2, 2, height, width)
    bottleneck, skips = model.encode(x)
    assert bottleneck.shape == (2, 8, height // 32, width // 32)
    assert [s.shape[1:] for s in skips] == [
        (c, height // 2**i, width // 2**i) for i, c in enumerate(SMALL[:5])
    ]
    assert model.bottleneck_features(height, width) == bottleneck[0].numel()
    for blocks in range(1, 6):
        out = model.decode(bottleneck, skips, blocks)
        scale = 2 ** (5 - blocks)
        assert out.shape == (2, model.decoder_channels(blocks), height // scale, width // scale)
    assert model(x).shape == (2, 3, height, width)


def test_default_widths_match_the_paper_at_192():
    model = UNet()
    assert model.decoder_channels(3) == 64
    assert model.bottleneck_features(192, 192) == 4608
    assert model.bottleneck_features(160, 160) == 3200
    assert [model.decoder_channels(level) for level in range(1, 6)] == [128, 128, 64, 32, 16]


def test_state_dict_prefixes_and_official_layer_counts():
    model = UNet(widths=SMALL)
    tops = {
        k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("decoder") else "")
        for k in model.state_dict()
    }
    assert tops == {"encoder", "head", *(f"decoder.{i}" for i in range(5))}
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    # encoder 12, decoder 4 x (1 + 2) + (1 + 1), head 3
    assert len(convs) == 12 + 14 + 3
    assert model.head[-1].bias is None and model.head[-1].kernel_size == (3, 3)
    assert len(model.decoder[4].convs) == 1


def test_2x2_conv_keeps_the_size():
    model = UNet(widths=SMALL)
    up = model.decoder[0].up_conv
    assert up(torch.randn(1, 8, 5, 7)).shape == (1, 8, 5, 7)


def test_size_not_divisible_by_32_names_the_size():
    with pytest.raises(ValueError, match="100x96"):
        UNet(widths=SMALL)(torch.randn(1, 1, 100, 96))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        UNet(widths=SMALL)(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"1\.\.5"):
        UNet(widths=SMALL).decoder_channels(6)
    with pytest.raises(ValueError, match="6 entries"):
        UNet(widths=(4, 4))


def _trained(model: UNet) -> UNet:
    """Make every parameter and BN buffer differ from a fresh model's."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()
    for _ in range(2):
        model(torch.randn(2, 1, 64, 64))
    return model.eval()


def test_stage_transfer_reproduces_encoder_and_decoder_blocks_exactly():
    torch.manual_seed(0)
    stage1 = _trained(UNet(widths=SMALL))
    encoder_state = partial_state_dict(stage1)
    assert encoder_state and all(k.startswith("encoder.") for k in encoder_state)

    stage2 = UNet(widths=SMALL)
    loaded = load_partial(stage2, encoder_state)
    assert loaded == sorted(encoder_state)
    for key, value in encoder_state.items():
        assert torch.equal(stage2.state_dict()[key], value)
    stage2 = _trained(stage2)  # stage 2 trains d_l; its encoder is a frozen copy
    load_partial(stage2, encoder_state)
    state = partial_state_dict(stage2, encoder=True, decoder_blocks=3)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("decoder")} == {
        "decoder.0", "decoder.1", "decoder.2",
    }  # fmt: skip

    stage3 = UNet(widths=SMALL, num_classes=4)
    load_partial(stage3, state)
    own = stage3.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    assert not torch.equal(
        own["decoder.3.up_conv.1.weight"], stage2.state_dict()["decoder.3.up_conv.1.weight"]
    )
    stage3.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        b2, s2 = stage2.encode(x)
        b3, s3 = stage3.encode(x)
        assert torch.equal(b2, b3)
        assert torch.equal(stage2.decode(b2, s2, 3), stage3.decode(b3, s3, 3))


def test_load_partial_rejects_mismatches_before_copying():
    model = UNet(widths=SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = partial_state_dict(UNet(widths=(4, 4, 8, 8, 8, 16)), decoder_blocks=1)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_partial(model, other)
    with pytest.raises(ValueError, match="keys not in the model"):
        load_partial(model, {"reg.weight": torch.zeros(1)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="decoder_blocks"):
        partial_state_dict(model, decoder_blocks=6)
