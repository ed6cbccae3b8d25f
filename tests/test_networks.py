"""EfficientAD networks: shapes, parameter counts, anomalib key names, map post-processing.

Shape sweeps run on the ``meta`` device (shape arithmetic without the FLOPs); one real forward pass
checks the whole model end to end on a non-square image.
"""

from __future__ import annotations

import pytest
import torch

from models.networks import (
    AutoEncoder,
    EfficientAD,
    PDNMedium,
    PDNSmall,
    build_pdn,
    decoder_sizes,
    imagenet_normalize,
)

SIZES = [(256, 256), (256, 320), (320, 256), (300, 512)]


def pdn_out_size(height: int, width: int, padding: bool) -> tuple[int, int]:
    """PDN-S/M output size, layer by layer from the paper's table (k4 p3, pool2 p1, k3 p1, k4)."""

    def one(n: int) -> int:
        p = 1 if padding else 0
        n = n + 2 * 3 * p - 4 + 1  # conv1 4x4
        n = (n + 2 * p - 2) // 2 + 1  # avgpool 2x2 s2
        n = n + 2 * 3 * p - 4 + 1  # conv2 4x4
        n = (n + 2 * p - 2) // 2 + 1  # avgpool
        n = n + 2 * p - 3 + 1  # conv3 3x3 (PDN-M: 1x1 then 3x3 p1, same size)
        return n - 4 + 1  # last 4x4 conv, no padding

    return one(height), one(width)


@pytest.mark.parametrize("size", ["s", "m"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_pdn_and_autoencoder_output_sizes_match(size, padding, hw):
    with torch.device("meta"):
        teacher = build_pdn(size, 384, padding)
        student = build_pdn(size, 768, padding)
        ae = AutoEncoder(384, padding)
    x = torch.empty(2, 3, *hw, device="meta")
    expected = pdn_out_size(*hw, padding)
    assert tuple(teacher(x).shape) == (2, 384, *expected)
    assert tuple(student(x).shape) == (2, 768, *expected)
    assert tuple(ae(x).shape) == (2, 384, *expected)


def test_output_sizes_at_256_are_the_papers():
    assert pdn_out_size(256, 256, False) == (56, 56)
    assert pdn_out_size(256, 256, True) == (64, 64)
    with torch.device("meta"):
        padded = EfficientAD("s", padding=True, pad_maps=False)
    x = torch.empty(1, 3, 256, 256, device="meta")
    assert tuple(padded.teacher(x).shape) == (1, 384, 64, 64)
    assert tuple(padded.ae(x).shape) == (1, 384, 64, 64)
    # research doc table 1.3: bilinear sizes of the decoder at 256 px
    assert decoder_sizes(256, 256, padding=False) == [
        (3, 3),
        (8, 8),
        (15, 15),
        (32, 32),
        (63, 63),
        (127, 127),
        (56, 56),
    ]
    assert decoder_sizes(256, 256, padding=True)[-1] == (64, 64)


def test_full_forward_gives_maps_at_input_size_for_non_square_input():
    torch.manual_seed(0)
    model = EfficientAD("s").eval()
    x = torch.rand(1, 3, 256, 320)
    with torch.no_grad():
        out = model(x)
    assert out.score.shape == (1,)
    for m in (out.anomaly_map, out.map_st, out.map_ae):
        assert m.shape == (1, 1, 256, 320)
        assert torch.isfinite(m).all()
    assert torch.allclose(out.score, out.anomaly_map.amax(dim=(-2, -1)).flatten())
    assert torch.allclose(out.anomaly_map, 0.5 * out.map_st + 0.5 * out.map_ae)
    raw_st, raw_ae = model.raw_maps(x)
    assert raw_st.shape == raw_ae.shape == (1, 1, 56, 72)


@pytest.mark.parametrize("hw", [(255, 256), (256, 255), (128, 128)])
def test_inputs_below_256_are_refused_with_a_clear_error(hw):
    model = EfficientAD("s")
    with pytest.raises(ValueError, match=r"too small.*>= 256"):
        model(torch.rand(1, 3, *hw))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_research_doc():
    with torch.device("meta"):
        s, m = EfficientAD("s"), EfficientAD("m")
    assert n_params(s) == 8_057_856
    assert n_params(m) == 20_738_432
    assert n_params(s.teacher) == 2_694_144
    assert n_params(s.student) == 4_267_392
    assert n_params(m.teacher) == 8_026_624
    assert n_params(m.student) == 11_615_488
    assert n_params(s.ae) == 1_096_320
    assert n_params(s.ae.encoder) == 444_224
    assert n_params(s.ae.decoder) == 652_096


def anomalib_keys(n_convs: int) -> set[str]:
    keys = set()
    for net in ("teacher", "student"):
        for i in range(1, n_convs + 1):
            keys |= {f"{net}.conv{i}.weight", f"{net}.conv{i}.bias"}
    for i in range(1, 7):
        keys |= {f"ae.encoder.enconv{i}.weight", f"ae.encoder.enconv{i}.bias"}
    for i in range(1, 9):
        keys |= {f"ae.decoder.deconv{i}.weight", f"ae.decoder.deconv{i}.bias"}
    keys |= {"mean_std.mean", "mean_std.std"}
    keys |= {f"quantiles.{q}" for q in ("qa_st", "qb_st", "qa_ae", "qb_ae")}
    return keys


@pytest.mark.parametrize(("size", "n_convs", "last"), [("s", 4, "conv4"), ("m", 6, "conv6")])
def test_state_dict_keys_and_shapes_are_anomalibs(size, n_convs, last):
    with torch.device("meta"):
        state = EfficientAD(size).state_dict()
    assert set(state) == anomalib_keys(n_convs)
    assert state[f"teacher.{last}.weight"].shape[0] == 384
    assert state[f"student.{last}.weight"].shape[0] == 768
    assert state["ae.encoder.enconv6.weight"].shape == (64, 64, 8, 8)
    assert state["ae.decoder.deconv8.weight"].shape == (384, 64, 3, 3)
    assert state["mean_std.mean"].shape == state["mean_std.std"].shape == (1, 384, 1, 1)
    for q in ("qa_st", "qb_st", "qa_ae", "qb_ae"):
        assert state[f"quantiles.{q}"].shape == ()
    if size == "s":
        assert state["teacher.conv1.weight"].shape == (128, 3, 4, 4)
        assert state["teacher.conv3.weight"].shape == (256, 256, 3, 3)
    else:
        assert state["teacher.conv1.weight"].shape == (256, 3, 4, 4)
        assert state["teacher.conv3.weight"].shape == (512, 512, 1, 1)
        assert state["teacher.conv4.weight"].shape == (512, 512, 3, 3)
        assert state["student.conv5.weight"].shape == (768, 512, 4, 4)
        assert state["student.conv6.weight"].shape == (768, 768, 1, 1)


def test_pdn_classes_have_teacher_file_keys():
    with torch.device("meta"):
        small, medium = PDNSmall(), PDNMedium()
    assert sorted(small.state_dict()) == sorted(
        f"conv{i}.{k}" for i in range(1, 5) for k in ("weight", "bias")
    )
    assert len(medium.state_dict()) == 12


def test_teacher_stays_frozen_in_train_mode():
    with torch.device("meta"):
        model = EfficientAD("s")
    model.train()
    assert not model.teacher.training
    assert model.student.training and model.ae.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_normalisation_constants_follow_the_input_dtype(dtype):
    x = torch.rand(1, 3, 8, 8)
    out = imagenet_normalize(x.to(dtype))
    assert out.dtype == dtype
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(out.float(), (x.to(dtype).float() - mean) / std, atol=0.05)


def test_half_precision_teacher_features_stay_half():
    torch.manual_seed(0)
    model = EfficientAD("s")
    model.mean_std.mean.fill_(0.5)
    model.mean_std.std.fill_(2.0)
    model = model.half().eval()
    x = torch.rand(1, 3, 64, 64).half()
    t = model.teacher_features(x)
    assert t.dtype == torch.float16
    raw = model.teacher(x)
    assert torch.allclose(t.float(), (raw.float() - 0.5) / 2.0, atol=1e-2)


def model_with_maps(monkeypatch, raw_st, raw_ae, pad_maps=True) -> EfficientAD:
    """A model whose raw_maps returns the given maps, to test padding, resizing and normalising."""
    with torch.device("meta"):
        model = EfficientAD("s", pad_maps=pad_maps)
    model.mean_std.to_empty(device="cpu")
    model.quantiles.to_empty(device="cpu")
    for name in ("qa_st", "qb_st", "qa_ae", "qb_ae"):
        getattr(model.quantiles, name).fill_(0.0)
    monkeypatch.setattr(model, "raw_maps", lambda x: (raw_st, raw_ae))
    return model


def test_maps_are_padded_resized_then_quantile_normalised(monkeypatch):
    raw_st = torch.full((1, 1, 56, 56), 2.0)
    raw_ae = torch.full((1, 1, 56, 56), 5.0)
    raw_st[0, 0, 10, 20] = 9.0  # one hot patch
    model = model_with_maps(monkeypatch, raw_st, raw_ae)
    x = torch.zeros(1, 3, 256, 256)

    out = model(x)  # quantiles not set: raw units
    st = out.map_st[0, 0]
    assert st.shape == (256, 256)
    # zero padding of 4 map cells = 16 px: the corner is 0, the centre keeps the raw value
    assert st[0, 0] == 0.0 and st[-1, -1] == 0.0
    assert st[128, 128] == pytest.approx(2.0)
    # the hot cell (10, 20) lands on padded cell (14, 24) = pixels 56..59 x 96..99
    peak = torch.nonzero(st == st.max())
    assert st.max() == pytest.approx(2.0 + 7.0 * 0.875**2)
    assert peak[:, 0].min() >= 56 and peak[:, 0].max() <= 59
    assert peak[:, 1].min() >= 96 and peak[:, 1].max() <= 99

    q = model.quantiles
    q.qa_st.fill_(1.0), q.qb_st.fill_(3.0), q.qa_ae.fill_(4.0), q.qb_ae.fill_(6.0)
    out = model(x)
    # 0.1 * (M - q_a) / (q_b - q_a): centre ST = 0.05, AE = 0.05; border = -0.05 / -0.2
    assert out.map_st[0, 0, 128, 128] == pytest.approx(0.05)
    assert out.map_ae[0, 0, 128, 128] == pytest.approx(0.05)
    assert out.map_st[0, 0, 0, 0] == pytest.approx(-0.05)
    assert out.map_ae[0, 0, 0, 0] == pytest.approx(-0.2)
    assert torch.allclose(out.anomaly_map, 0.5 * out.map_st + 0.5 * out.map_ae)
    # bilinear x4 (align_corners=False): pixels 57/58 take 0.875 of cell 14 per axis
    hot_st = 2.0 + (9.0 - 2.0) * 0.875**2
    hot = 0.5 * 0.1 * (hot_st - 1.0) / 2.0 + 0.5 * 0.05
    assert out.score.item() == pytest.approx(hot, rel=1e-5)


def test_without_map_padding_maps_are_only_resized(monkeypatch):
    raw = torch.full((1, 1, 64, 80), 3.0)
    model = model_with_maps(monkeypatch, raw, raw, pad_maps=False)
    out = model(torch.zeros(1, 3, 256, 320))
    assert out.anomaly_map.shape == (1, 1, 256, 320)
    assert torch.allclose(out.anomaly_map, torch.full_like(out.anomaly_map, 3.0))
