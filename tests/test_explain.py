"""Grad-CAM looks where the evidence is: a tiny CNN taught that one square's colour is the class."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from carclf.config import ModelConfig
from carclf.data.transforms import Preprocess, eval_transform
from carclf.errors import UserInputError
from carclf.explain import METHODS, Explainer, target_layer_for
from carclf.explain_request import METHOD_NAMES, check_method, class_index
from carclf.export import export_onnx
from carclf.inference import onnx_session
from carclf.models import create_model

SIDE, SQUARE = 48, 12
PRE = Preprocess(input_size=(3, SIDE, SIDE), mean=(0.5,) * 3, std=(0.5,) * 3)
LABELS = ["red", "green", "blue"]


def square_image(colour: int, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int]]:
    """Grey noise everywhere, one square of pure ``colour`` somewhere; its top-left corner."""
    img = np.repeat(rng.integers(0, 140, size=(SIDE, SIDE, 1), dtype=np.uint8), 3, axis=2)
    y0, x0 = (int(v) for v in rng.integers(0, SIDE - SQUARE + 1, size=2))
    img[y0 : y0 + SQUARE, x0 : x0 + SQUARE] = 0
    img[y0 : y0 + SQUARE, x0 : x0 + SQUARE, colour] = 255
    return Image.fromarray(img), (y0, x0)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """scratch_cnn_bn trained in plain PyTorch for a few seconds until it reads the square."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model(
        ModelConfig(name="scratch_cnn_bn", kwargs={"filters": [8, 16], "dense_units": 0}), 3
    )
    transform = eval_transform(PRE)
    ys = rng.integers(0, 3, size=192)
    x = torch.stack([transform(square_image(int(q), rng)[0]) for q in ys])
    y = torch.from_numpy(ys)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(6):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95  # it did learn the rule
    return model


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"])
def test_heatmap_peaks_inside_the_deciding_square(trained: nn.Module, method: str) -> None:
    explainer = Explainer(trained, PRE, LABELS)
    rng = np.random.default_rng(1)
    colours = [0, 1, 2, 0, 1, 2]
    cases = [square_image(c, rng) for c in colours]
    exps = explainer.explain([img for img, _ in cases], method=method)  # one batch
    margin = SIDE // 12  # one cell of the 12×12 activation map upsampled to 48 px
    for exp, c, (_, (y0, x0)) in zip(exps, colours, cases, strict=True):
        assert exp.target == c and exp.heatmap.shape == (SIDE, SIDE)
        py, px = np.unravel_index(exp.heatmap.argmax(), exp.heatmap.shape)
        assert y0 - margin <= py < y0 + SQUARE + margin, (method, c, py, y0)
        assert x0 - margin <= px < x0 + SQUARE + margin, (method, c, px, x0)
        inside = exp.heatmap[y0 : y0 + SQUARE, x0 : x0 + SQUARE].mean()
        assert inside > 2 * exp.heatmap.mean()
        assert exp.overlay.size == (SIDE, SIDE)


def test_explainer_class_equals_onnx_class(trained: nn.Module, tmp_path: Path) -> None:
    export_onnx(trained, PRE.input_size, tmp_path / "m.onnx", opset=18)
    session, _ = onnx_session(str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(2)
    images = [square_image(q % 3, rng)[0] for q in range(8)]
    batch = torch.stack([eval_transform(PRE)(img) for img in images]).numpy()
    onnx_class = session.run(["logits"], {"input": batch})[0].argmax(1)
    exps = Explainer(trained, PRE, LABELS).explain(images)
    assert [e.target for e in exps] == onnx_class.tolist()


def test_target_layer_override_and_bad_names(trained: nn.Module) -> None:
    assert Explainer(trained, PRE, LABELS).target_layer_name == target_layer_for(trained)
    first = Explainer(trained, PRE, LABELS, target_layer="features.0")
    assert first.target_layer is trained.features[0]
    exp = first.explain([square_image(0, np.random.default_rng(3))[0]], target="blue")[0]
    assert exp.target == 2 and exp.label == "blue"
    with pytest.raises(UserInputError, match="not a module"):
        Explainer(trained, PRE, LABELS, target_layer="features.99")
    with pytest.raises(UserInputError, match="unknown class"):
        first.explain([square_image(0, np.random.default_rng(3))[0]], target="sideways")
    assert tuple(METHODS) == METHOD_NAMES
    with pytest.raises(UserInputError, match="method: unknown 'gradcam2'; one of gradcam, "):
        first.explain([square_image(0, np.random.default_rng(3))[0]], method="gradcam2")


def test_check_method_in_the_clients_terms() -> None:
    assert check_method("eigencam") == "eigencam"
    for bad in ("GradCAM", None, ["gradcam"], 10**5000):
        with pytest.raises(UserInputError, match=r"^method: unknown .*; one of gradcam, "):
            check_method(bad)


def test_vit_tokens_become_a_2d_map() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3).eval()
    assert target_layer_for(vit) == f"blocks.{len(vit.blocks) - 1}.norm1"
    pre = Preprocess(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for method in ("gradcam", "gradcam++"):
        exp = Explainer(vit, pre, ["a", "b", "c"]).explain([img], method=method)[0]
        assert exp.heatmap.shape == (32, 32) and np.isfinite(exp.heatmap).all()
        assert exp.heatmap.max() > exp.heatmap.min()  # a real 2×2-token map, not a constant


def test_concurrent_explanations_equal_the_sequential_ones(trained: nn.Module) -> None:
    """Threads sharing one explainer (as a Serve replica's thread pool does) get, bit for bit,
    the heatmaps and scores they would get one by one; unserialised, their hooks and
    gradients on the shared model would mix."""
    explainer = Explainer(trained, PRE, LABELS)
    rng = np.random.default_rng(4)
    images = [square_image(q % 3, rng)[0] for q in range(3)]
    jobs = [(method, target) for method in ("gradcam", "gradcam++") for target in (None, "blue")]
    expected = {job: explainer.explain(images, *job) for job in jobs}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [(job, pool.submit(explainer.explain, images, *job)) for job in jobs * 4]
        for job, future in futures:
            got, want = future.result(), expected[job]
            assert [e.target for e in got] == [e.target for e in want], job
            assert [e.score for e in got] == [e.score for e in want], job
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g.heatmap, w.heatmap, err_msg=str(job))


@pytest.mark.parametrize(
    ("target", "expected"),
    [(None, None), ("", None), (1, 1), ("2", 2), ("02", 2), ("green", 1)],
)
def test_class_index_of_what_clients_send(target: object, expected: int | None) -> None:
    assert class_index(target, LABELS) == expected


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("²", "unknown class '²'"),  # str.isdigit() says yes, int() says no
        ("nope", "unknown class 'nope'"),
        ([], "a class name or index is needed"),
        ({}, "a class name or index is needed"),
        (True, "a class name or index is needed"),
        (1.0, "a class name or index is needed"),
        (-1, "outside 0..2"),
        ("-1", "outside 0..2"),
        (1_000_000_000, "outside 0..2"),
        # past int()'s 4,300-digit limit for text, and the test ids' too
        pytest.param("9" * 5000, "outside 0..2", id="5000-digit string"),
        pytest.param(10**5000, "outside 0..2", id="5000-digit int"),
    ],
)
def test_class_index_refuses_in_the_clients_terms(target: object, reason: str) -> None:
    with pytest.raises(UserInputError, match="target: ") as err:
        class_index(target, LABELS)
    assert reason in str(err.value) and len(str(err.value)) < 150
