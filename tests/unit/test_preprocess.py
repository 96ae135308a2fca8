"""Control-map preprocessors: Canny against analytic edges, and every method's shape, range and failure modes."""

import pytest
import torch

from trainers.errors import ConfigError, ModelError
from trainers.preprocess import (PREPROCESSORS, DepthEstimator, PreprocessOptions, canny, content_shuffle,
                                 control_map, luminance, normal_from_depth)


def square_image(side: int = 64, low: int = 16, high: int = 48, value: float = 1.0) -> torch.Tensor:
    image = torch.zeros(1, side, side, 3)
    image[:, low:high, low:high, :] = value
    return image


def square_outline(side: int = 64, low: int = 16, high: int = 48) -> torch.Tensor:
    """The pixels of the square that touch the outside: where a one-pixel edge on the bright side must lie."""
    inside = torch.zeros(side, side, dtype=torch.bool)
    inside[low:high, low:high] = True
    interior = torch.zeros_like(inside)
    interior[low + 1:high - 1, low + 1:high - 1] = True
    return inside & ~interior


def reachable_from(seed: tuple[int, int], free: torch.Tensor) -> torch.Tensor:
    """4-connected flood fill over `free` pixels."""
    reached = torch.zeros_like(free)
    reached[seed] = True
    while True:
        cross = reached.clone()
        cross[1:] |= reached[:-1]
        cross[:-1] |= reached[1:]
        cross[:, 1:] |= reached[:, :-1]
        cross[:, :-1] |= reached[:, 1:]
        grown = cross & free
        if torch.equal(grown, reached):
            return reached
        reached = grown


def edges_of(image: torch.Tensor, **options) -> torch.Tensor:
    return control_map(image, "canny", PreprocessOptions(**options))[0, :, :, 0] > 0.5


def test_canny_on_a_square_is_exactly_its_one_pixel_outline():
    edges = edges_of(square_image())

    assert torch.equal(edges, square_outline())


def test_canny_outline_of_a_disk_is_thin_closed_and_on_the_circle():
    side, radius = 96, 30.0
    ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    distance = torch.hypot(ys - side / 2, xs - side / 2)
    image = (distance <= radius).float()[None, :, :, None].expand(1, side, side, 3)

    edges = edges_of(image)

    assert (distance[edges] - radius).abs().max() <= 1.5, "edges off the circle"
    assert edges.sum() < 2 * 2 * torch.pi * radius * 1.2, "edges thicker than about one pixel"
    inside = reachable_from((side // 2, side // 2), ~edges)
    assert not inside[0].any() and not inside[:, 0].any(), "the outline has a gap"
    assert inside.sum() > 0.8 * torch.pi * (radius - 2) ** 2


def test_canny_thresholds_are_monotone():
    # Squares of falling contrast: higher thresholds can only lose edges.
    image = torch.zeros(1, 64, 256, 3)
    for n, value in enumerate((1.0, 0.6, 0.35, 0.2, 0.1, 0.05)):
        image[:, 16:48, 8 + 40 * n:40 + 40 * n, :] = value
    counts = [int(edges_of(image, low_threshold=high / 2, high_threshold=high).sum())
              for high in (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-2] > counts[-1]
    low_counts = [int(edges_of(image, low_threshold=low, high_threshold=0.5).sum()) for low in (0.0, 0.1, 0.3, 0.5)]
    assert low_counts == sorted(low_counts, reverse=True)


def test_hysteresis_keeps_a_weak_edge_only_when_it_joins_a_strong_one():
    gray = torch.zeros(1, 1, 32, 128)
    gray[..., 8:24, 4:28] = 0.15  # a dim square on its own: weak edges only
    gray[..., 8:24, 36:120] = torch.linspace(1.0, 0.15, 84)  # bright on the left, as dim as the other on the right
    edges = canny(gray, low=0.05, high=0.3)[0, 0] > 0

    assert not edges[:, :32].any()
    assert edges[16, 35:37].any() and edges[8, 100] and edges[16, 119], "the weak part of a connected edge was dropped"
    assert canny(gray, low=0.3, high=0.3)[0, 0, 16, 119] == 0


@pytest.mark.parametrize("method", [m for m in PREPROCESSORS if m not in ("depth", "normal")])
def test_every_weight_free_preprocessor_keeps_layout_size_and_range(method):
    images = torch.rand(2, 40, 56, 3)
    images[1] = square_image(56)[0, 8:48]

    out = control_map(images, method)

    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    if method not in ("none", "shuffle"):
        assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2]), "not a gray map"


def test_none_returns_the_image_and_grayscale_and_threshold_follow_brightness():
    image = torch.tensor([[[[0.2, 0.2, 0.2], [0.9, 0.9, 0.9]]]])
    assert torch.equal(control_map(image, "none"), image)
    assert torch.allclose(control_map(image, "grayscale")[..., 0], luminance(image)[:, 0])
    assert control_map(image, "threshold", PreprocessOptions(threshold=0.5))[0, 0, :, 0].tolist() == [0.0, 1.0]


def test_soft_edge_is_strongest_on_the_edges_and_scribble_is_thicker_than_canny():
    image = square_image()
    soft = control_map(image, "soft_edge")[0, :, :, 0]
    scribble = control_map(image, "scribble")[0, :, :, 0] > 0.5

    assert soft.max() == 1 and soft[32, 32] < 1e-6 and soft[2, 2] < 1e-6
    assert soft[32, 15:17].min() > 0.5
    assert scribble.sum() > 2 * edges_of(image).sum() and not scribble[32, 32]
    assert control_map(torch.full((1, 16, 16, 3), 0.5), "soft_edge").max() == 0, "a flat image has no edges"


def test_shuffle_is_seeded_keeps_colours_and_scrambles_layout():
    image = torch.zeros(1, 64, 64, 3)
    image[:, :, :32, 0] = 1.0  # red left half, blue right half
    image[:, :, 32:, 2] = 1.0

    first, again, other = (content_shuffle(image, seed) for seed in (1, 1, 2))

    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.allclose(first, image, atol=0.1)
    assert torch.allclose(first[..., 0] + first[..., 2], torch.ones(1, 64, 64), atol=1e-5)
    assert torch.equal(first[..., 1], torch.zeros(1, 64, 64))


def save_tiny_depth_model(folder) -> None:
    """A random DPT depth model of a few hundred kB, saved as a downloaded one would be."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
                       patch_size=8, neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[4, 2, 1, 0.5])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory) -> DepthEstimator:
    folder = tmp_path_factory.mktemp("tiny-dpt")
    save_tiny_depth_model(folder)
    return DepthEstimator(folder)


@pytest.mark.parametrize("method", ["depth", "normal"])
def test_depth_and_normal_run_a_local_depth_model(tiny_depth_model, method):
    images = torch.rand(2, 40, 56, 3)

    out = control_map(images, method, depth_model=tiny_depth_model)

    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    if method == "depth":
        assert out.amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("method", ["depth", "normal"])
def test_depth_and_normal_without_a_model_say_what_to_download(method):
    with pytest.raises(ConfigError, match="depth-estimation model") as error:
        control_map(torch.rand(1, 8, 8, 3), method)
    assert "download" in error.value.fix


def test_a_folder_without_a_depth_model_is_a_model_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match="config.json") as error:
        DepthEstimator(tmp_path)
    assert error.value.where == str(tmp_path) and "download" in error.value.fix


def test_normals_of_a_ramp_tilt_towards_the_lower_side_and_flat_is_straight_on():
    flat = normal_from_depth(torch.zeros(1, 1, 16, 16))
    assert torch.allclose(flat, torch.tensor([0.5, 0.5, 1.0]).expand(1, 16, 16, 3))
    ramp = torch.linspace(0, 1, 32).expand(1, 1, 32, 32)  # nearer towards the right: the surface faces left
    normal = normal_from_depth(ramp)[0, 16, 16]
    assert normal[0] < 0.5 and normal[1] == pytest.approx(0.5) and normal[2] > 0.5


@pytest.mark.parametrize("images, match", [(torch.zeros(0, 64, 64, 3), "empty"), (torch.zeros(1, 0, 64, 3), "empty"),
                                           (torch.zeros(1, 64, 64), "shaped")])
def test_empty_or_misshaped_images_are_refused(images, match):
    with pytest.raises(ConfigError, match=match):
        control_map(images, "canny")


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError) as error:
        control_map(square_image(), "canny", PreprocessOptions(low_threshold=0.5, high_threshold=0.2))
    assert error.value.where == "low_threshold"
    with pytest.raises(ConfigError) as error:
        control_map(square_image(), "sketch")
    assert error.value.where == "preprocessor" and "canny" in error.value.fix
