import pytest
import torch

from meddiff.errors import ConfigError
from meddiff.nets import DiffusersUNet, build_net, count_parameters


def test_monai_unet_shapes_and_class_embedding(tiny_net_cfg):
    net = build_net({**tiny_net_cfg, "num_class_embeds": 6})
    out = net(torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 99]), torch.tensor([0, 1, 5]))
    assert out.shape == (3, 1, 16, 16)
    # different classes give different outputs: the embedding is wired in (MONAI zero-inits the output conv)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([10])
    assert not torch.allclose(net(x, t, torch.tensor([0])), net(x, t, torch.tensor([3])))


def test_seed_sizes_parameter_counts():
    seed_mnist = build_net(dict(channels=(64, 128, 256), num_res_blocks=2, attention_levels=(False, False, True)))
    assert 14e6 < count_parameters(seed_mnist) < 17e6


def test_unknown_net_and_bad_groups(tiny_net_cfg):
    with pytest.raises(ConfigError, match="net.name"):
        build_net({"name": "resnet9000"})
    with pytest.raises(ConfigError, match="norm_num_groups"):
        build_net({**tiny_net_cfg, "channels": (12, 16)})


def test_pretrained_folder_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="huggingface-cli download"):
        DiffusersUNet(pretrained_dir=str(tmp_path / "nowhere"))


def test_pretrained_folder_roundtrip_with_grayscale_adaptation(tmp_path):
    """A tiny random UNet2DModel in the celebahq layout (3 channels) saved with save_pretrained loads from the
    local folder through the same code, and serves 1-channel data (repeat in, average out)."""
    from diffusers import UNet2DModel

    ref = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    ref.save_pretrained(tmp_path / "celebahq-like")
    net = build_net({"name": "diffusers_unet", "pretrained_dir": str(tmp_path / "celebahq-like"), "data_channels": 1})
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    out = net(x, t)
    assert out.shape == (2, 1, 16, 16)
    expected = ref(x.repeat(1, 3, 1, 1), t).sample.mean(1, keepdim=True)
    torch.testing.assert_close(out, expected)
