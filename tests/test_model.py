import pytest
import timm
import torch
from safetensors.torch import save_file

from remdr.config import DataConfig, ModelConfig
from remdr.encoders import create_encoder
from remdr.errors import ConfigError
from remdr.model import ReM3Dr

MCFG = ModelConfig(embed_dim=16, fusion_hidden=16)


@pytest.mark.parametrize("view", ["bscans", "rnflt"])
def test_output_shapes_for_both_oct_views(view):
    dcfg = DataConfig(image_size=32, oct_view=view, n_bscans=3)
    model = ReM3Dr(MCFG, dcfg).eval()
    oct_x = torch.randn(5, 3, 1, 32, 32) if view == "bscans" else torch.randn(5, 1, 32, 32)
    out = model(oct_x, torch.randn(5, 1, 32, 32))
    assert out["pred"].shape == out["pred_oct"].shape == out["pred_fundus"].shape == (5,)
    assert out["z_oct"].shape == out["z_fundus"].shape == (5, 16)
    assert (model.branches["oct"].pool is not None) == (view == "bscans")


def test_unimodal_model_has_one_branch_and_no_fusion():
    model = ReM3Dr(MCFG, DataConfig(image_size=32), ("fundus",))
    assert list(model.branches) == ["fundus"] and model.fusion is None
    out = model(None, torch.randn(2, 1, 32, 32))
    assert torch.equal(out["pred"], out["pred_fundus"])


def test_colour_fundus_and_target_scaling():
    dcfg = DataConfig(image_size=32, fundus_channels=3)
    model = ReM3Dr(MCFG, dcfg)
    assert model(torch.randn(2, 4, 1, 32, 32), torch.randn(2, 3, 32, 32))["pred"].shape == (2,)
    md = torch.tensor([-30.0, 0.0])
    assert torch.allclose(model.to_db(model.normalise(md)), md)


def test_unknown_encoder_and_missing_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean"):
        create_encoder("resnet19", 1)
    with pytest.raises(ConfigError, match="not found"):
        create_encoder("test_resnet", 1, str(tmp_path / "nope.safetensors"))


def test_local_weights_load_and_adapt_input_channels(tmp_path):
    src = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = create_encoder("test_resnet", 1, str(path))
    assert enc.conv1[0].weight.shape[1] == 1
    assert torch.allclose(enc.conv1[0].weight, src.conv1[0].weight.sum(1, keepdim=True))
    assert torch.equal(enc.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    bad = tmp_path / "bad.safetensors"
    save_file({"nothing.weight": torch.zeros(3)}, str(bad))
    with pytest.raises(ConfigError, match="matches no parameter"):
        create_encoder("test_resnet", 1, str(bad))
