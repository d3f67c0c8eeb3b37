"""Grad-CAM stage: maps, localisation scores, the out-of-fold rule, outputs logged to MLflow,
and the single-image mode, on timm's tiny test_efficientnet (random fold-specific weights)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from src.artifacts.checkpoint import CheckpointMeta
from src.artifacts.store import PreparedStore
from src.core.errors import BoneHealthError, DataError
from src.explain.cam import (
    METHODS,
    explain_image,
    explain_tensor,
    input_gradient_saliency,
    resolve_target_layer,
    resolve_target_layers,
)
from src.explain.faithfulness import (
    area_fraction,
    energy_inside,
    localisation,
    perturbation_score,
    pointing_hit,
    random_map,
    ratios,
    summarise,
)
from src.explain.figures import (
    SheetItem,
    contact_sheet,
    save_contact_sheet,
    save_overlay,
)
from src.explain.oof_explain import (
    ZHANG_TOLERANCE,
    load_fold_model,
    mask_for,
    out_of_fold_model,
    pointing_tolerance_px,
    run_gradcam,
    select_images,
    stored_box,
)
from src.explain.sanity import (
    cascade_groups,
    cut_points,
    randomised_cascade,
    rank_similarity,
)
from src.gradcam import main
from src.model.factory import create_model, load_checkpoint, predict_proba
from tests.gradcam_helpers import (
    CLASSES,
    SIZE,
    SRC_H,
    SRC_W,
    TINY_MODEL,
    cam_params,
    make_cam_inputs,
    make_parent_run,
)
from tests.train_helpers import write_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_cam_inputs(tmp_path_factory.mktemp("cam"), n_per_class=4, folds=2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model(TINY_MODEL, num_classes=2, in_chans=1).eval()
    meta = CheckpointMeta(model=TINY_MODEL, classes=CLASSES, input_size=[48, 80])
    return model, meta


# ----------------------------------------------------------------------------- maps
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_map_of_the_image_shape_in_unit_range(tiny, method):
    model, meta = tiny
    image = np.random.default_rng(1).integers(0, 256, (48, 80), dtype=np.uint8)  # non-square: no H/W swap
    cam, probs = explain_image(model, meta, image, method=method)
    assert cam.shape == (48, 80) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert cam.max() == pytest.approx(1.0) or cam.max() == 0.0  # scaled to its peak, or empty
    np.testing.assert_allclose(probs, predict_proba(model, image[None], meta)[0], atol=1e-5)
    assert not any(p.grad is not None for p in model.parameters())  # no gradients left behind


def test_map_is_resized_back_to_the_stored_image_size(tiny):
    model, meta = tiny
    image = np.zeros((96, 160), dtype=np.uint8)  # input_size is 48x80: the map comes back at 96x160
    cam, _ = explain_image(model, meta, image, method="gradcam")
    assert cam.shape == (96, 160)


def test_saliency_is_the_absolute_input_gradient():
    # A linear model: d logit_1 / d x = w_1, so the map must be |w_1| / max |w_1|.
    weights = torch.zeros(2, 12)
    weights[1] = torch.linspace(-3, 1, 12)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.copy_(weights)
        model[1].bias.zero_()
    x = torch.ones(1, 1, 3, 4)
    cam, probs, target = input_gradient_saliency(model, x, target=1)
    expected = (weights[1].abs() / weights[1].abs().max()).reshape(3, 4).numpy()
    np.testing.assert_allclose(cam, expected, atol=1e-6)
    assert target == 1 and probs.sum() == pytest.approx(1.0)


class PostPoolHead(torch.nn.Module):
    """MobileNetV3-like: a 1x1 conv AFTER global pooling, whose (N, C, 1, 1) output is 4-D."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.conv_head = torch.nn.Conv2d(4, 8, 1)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv_head(self.pool(self.features(x))).flatten(1))


def test_target_layer_defaults_names_and_errors(tiny):
    model, _ = tiny
    assert resolve_target_layer(model, None, (1, 1, 64, 64))[0] == "bn2"  # timm EfficientNet
    resnet = create_model("test_resnet", num_classes=2, in_chans=1).eval()
    assert resolve_target_layer(resnet, None, (1, 1, 64, 64))[0] == "layer4"  # generic: last spatial map
    assert resolve_target_layer(PostPoolHead(), None, (1, 1, 16, 16))[0] == "features"  # not the 1x1 head
    name, layer = resolve_target_layer(model, "blocks.1", (1, 1, 64, 64))
    assert name == "blocks.1" and layer is model.blocks[1]
    with pytest.raises(BoneHealthError, match=r"'blocks\.9' is not a module of EfficientNet; did you mean"):
        resolve_target_layer(model, "blocks.9", (1, 1, 64, 64))
    with pytest.raises(BoneHealthError, match=r"'classifier' does not output a 4-D feature map.*'bn2'"):
        resolve_target_layer(model, "classifier", (1, 1, 64, 64))
    with pytest.raises(BoneHealthError, match="unknown method 'gradcam2'"):
        explain_image(model, CheckpointMeta(model=TINY_MODEL, classes=CLASSES, input_size=[64, 64]),
                      np.zeros((64, 64), np.uint8), "gradcam2")


def test_target_layer_by_stride_and_fused_layers(tiny):
    model, meta = tiny
    shape = (1, 1, 64, 64)
    # timm's feature_info names the module ending each stage
    assert [n for n, _ in resolve_target_layers(model, "stride4", shape)] == ["blocks.1"]
    assert [n for n, _ in resolve_target_layers(model, ["stride8", "bn2"], shape)] == ["blocks.2", "bn2"]
    assert [n for n, _ in resolve_target_layers(model, None, shape)] == ["bn2"]
    # without feature_info: the last module whose map is the input over the stride
    assert resolve_target_layer(PostPoolHead(), "stride1", (1, 1, 16, 16))[0] == "features"
    with pytest.raises(BoneHealthError, match=r"no stage at stride64 for input \[64, 64\]; strides there: .*stride4"):
        resolve_target_layers(model, "stride64", shape)
    with pytest.raises(BoneHealthError, match=r"names the layer .* more than once"):
        resolve_target_layers(model, ["stride4", "blocks.1"], shape)
    with pytest.raises(BoneHealthError, match="an empty list"):
        resolve_target_layers(model, [], shape)
    # a map from any layer comes back at the input size; a fused map is one such map
    image = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    x = torch.as_tensor(image, dtype=torch.float32)[None, None] / 255.0
    coarse = explain_tensor(model, x, "hirescam", [model.bn2], target=1)[0]
    fine = explain_tensor(model, x, "hirescam", [model.blocks[1]], target=1)[0]
    assert coarse.shape == fine.shape == (64, 64) and not np.allclose(coarse, fine)
    fused, _ = explain_image(model, meta, image[:48], "layercam", ["stride4", "stride8", "stride16"])
    assert fused.shape == (48, 64) and 0.9 < fused.max() <= 1.0  # resized from the model's 48x80 input


# ------------------------------------------------------------------ localisation scores
def test_localisation_scores_on_hand_made_maps():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:3] = True  # 4 of 20 pixels
    assert area_fraction(mask) == pytest.approx(0.2)
    cam = np.zeros((4, 5))
    cam[1, 1], cam[0, 0] = 0.6, 0.4
    assert energy_inside(cam, mask) == pytest.approx(0.6)
    assert pointing_hit(cam, mask) == 1.0
    cam[0, 0] = 0.9  # the peak moves outside; energy 0.6 / 1.5
    assert energy_inside(cam, mask) == pytest.approx(0.4)
    assert pointing_hit(cam, mask) == 0.0
    uniform = np.ones((4, 5))  # a map without information scores exactly the area fraction
    assert energy_inside(uniform, mask) == pytest.approx(0.2)
    assert pointing_hit(uniform, mask) == pytest.approx(0.2)  # plateau: random tie-break
    plateau = np.zeros((4, 5))
    plateau[1, 1] = plateau[0, 4] = 1.0
    assert pointing_hit(plateau, mask) == pytest.approx(0.5)
    assert math.isnan(energy_inside(np.zeros((4, 5)), mask)) and math.isnan(pointing_hit(np.zeros((4, 5)), mask))
    with pytest.raises(BoneHealthError, match=r"heat map shape \(2, 2\) differs from mask shape \(4, 5\)"):
        energy_inside(np.ones((2, 2)), mask)


def test_summary_means_per_class_and_overall_skip_empty_maps():
    rows = [{"class": "C1", "energy_inside": 0.2, "pointing_hit": 1.0},
            {"class": "C1", "energy_inside": 0.4, "pointing_hit": 0.0},
            {"class": "C3", "energy_inside": math.nan, "pointing_hit": math.nan},
            {"class": "C3", "energy_inside": 0.9, "pointing_hit": 1.0}]
    out = summarise(rows, ["C1", "C3"], ["energy_inside", "pointing_hit"])
    assert out["energy_inside_C1"] == pytest.approx(0.3) and out["pointing_hit_C1"] == pytest.approx(0.5)
    assert out["energy_inside_C3"] == pytest.approx(0.9) and out["n_empty_maps_C3"] == 1
    assert out["energy_inside_all"] == pytest.approx(1.5 / 3) and out["n_images_all"] == 4


class RegionModel(torch.nn.Module):
    """Logit of class 1 = 20 * (mean brightness of a fixed square - 0.5): only that square matters."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        region = x[:, 0, 8:16, 8:16].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(region), self.scale * (region - 0.5)], dim=1)


def test_road_rewards_the_map_that_marks_what_the_model_uses():
    x = torch.zeros(1, 1, 24, 24)
    x[0, 0, 8:16, 8:16] = 1.0
    good = np.zeros((24, 24), np.float32)
    good[8:16, 8:16] = 1.0
    good += np.linspace(0, 0.1, 24 * 24, dtype=np.float32).reshape(24, 24)  # break ties for the percentiles
    torch.manual_seed(0)
    right = perturbation_score(RegionModel(), x, good, 1, "road", [20, 40, 60, 80])
    wrong = perturbation_score(RegionModel(), x, 1.1 - good, 1, "road", [20, 40, 60, 80])
    assert right > 0.2 and wrong < -0.2
    drop = perturbation_score(RegionModel(), x, 1.1 - good, 1, "confidence_change")  # dims the region
    assert drop < -0.5
    # why ROAD needs no random-map run: a map and its complement score opposite values
    noise = random_map((24, 24), np.random.default_rng(0))
    assert noise.shape == (24, 24) and 0 <= noise.min() and noise.max() <= 1
    plus = perturbation_score(RegionModel(), x, noise, 1, "road", [30, 50])
    minus = perturbation_score(RegionModel(), x, 1 - noise, 1, "road", [30, 50])
    assert abs(plus) > 0.01 and plus + minus == pytest.approx(0, abs=0.01)


def test_pointing_game_tolerance_counts_a_peak_near_the_region():
    mask = np.zeros((20, 20), bool)
    mask[10:12, 4:16] = True  # a thin band, like the cortex
    cam = np.zeros((20, 20))
    cam[7, 8] = 1.0  # 3 px above the band
    assert pointing_hit(cam, mask) == 0.0
    assert pointing_hit(cam, mask, tolerance_px=2.9) == 0.0 and pointing_hit(cam, mask, tolerance_px=3.0) == 1.0
    scores = localisation(cam, mask, tolerance_px=4.0)
    assert scores["pointing_hit"] == 1.0 and scores["pointing_inside"] == 0.0
    assert scores["area_fraction"] == pytest.approx(24 / 400)
    assert ratios({"energy_inside_all": 0.3, "area_fraction_all": 0.05, "energy_inside_C1": 0.1}, ["C1", "all"]) == {
        "energy_over_area_all": pytest.approx(6.0)}


def test_pointing_tolerance_in_stored_pixels(inputs):
    store = PreparedStore.open(inputs["store"])
    side = float(store.manifest["crop_side"].iat[0])  # 80 source px -> 64 stored px
    # 0.25 mm per source pixel: 4 mm = 16 source px = 12.8 stored px
    assert pointing_tolerance_px(store, 0, 4.0, 0.25) == pytest.approx(4.0 / 0.25 * SIZE / side)
    assert pointing_tolerance_px(store, 0, 4.0, None) == pytest.approx(15 / 224 * SIZE)  # no mm scale


def test_crop_box_in_stored_pixels_for_figures_of_data_without_masks(inputs):
    store = PreparedStore.open(inputs["store"])
    rec = store.manifest.iloc[0]
    x, y, w, h = stored_box(store, 0)
    scale = SIZE / rec["crop_side"]
    assert (x, y) == pytest.approx(((rec["box_x"] - rec["crop_x0"]) * scale, (rec["box_y"] - rec["crop_y0"]) * scale))
    assert (w, h) == pytest.approx((rec["box_w"] * scale, rec["box_h"] * scale))
    assert 0 <= x and x + w <= SIZE  # the box lies inside its own crop
    no_box = PreparedStore(store.root, store.images, store.manifest.drop(columns=["box_x"]), store.meta)
    assert stored_box(no_box, 0) is None


# ------------------------------------------------------------------ sanity checks
class InputFirst(torch.nn.Module):
    """A tiny CNN whose first module hands on the input unchanged: a map made from it alone
    (EigenCAM there) is the image itself, whatever the weights - the failure the randomisation
    test is there to catch."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Identity()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.features(self.inp(x)).mean(dim=(2, 3)))


def test_cascade_randomises_from_the_top_down(tiny):
    model, _ = tiny
    names = [n for n, _ in cascade_groups(model)]
    assert names[0] == "classifier" and names[-1] == "conv_stem"
    assert names.index("blocks.4") < names.index("blocks.0")  # the stages, last first
    assert cut_points(12, 4) == [3, 6, 9, 12] and cut_points(3, 8) == [1, 2, 3] and cut_points(12, None)[-1] == 12
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    steps = randomised_cascade(model, 3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model itself too
    assert [s.groups for s in steps] == cut_points(len(names), 3)
    first, last = steps[0].model.state_dict(), steps[-1].model.state_dict()
    assert not torch.equal(first["classifier.weight"], before["classifier.weight"])
    assert torch.equal(first["conv_stem.weight"], before["conv_stem.weight"])  # the bottom not yet
    assert not torch.equal(last["conv_stem.weight"], before["conv_stem.weight"])
    again = randomised_cascade(model, 3, seed=0)[-1].model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in last.items())  # seeded


def test_rank_similarity_and_the_test_tells_a_weight_blind_map_from_a_real_one():
    a = np.arange(16, dtype=float).reshape(4, 4)
    assert rank_similarity(a, a * 3 + 1) == pytest.approx(1.0)
    assert rank_similarity(a, -a) == pytest.approx(1.0)  # an inverted map survived too
    assert rank_similarity(a, np.zeros((4, 4))) == 0.0 and math.isnan(rank_similarity(np.ones((4, 4)), a))

    torch.manual_seed(7)
    model = InputFirst().eval()
    x = torch.rand(1, 1, 24, 24)
    steps = randomised_cascade(model, None, seed=0)
    assert [s.label for s in steps] == ["head", "features.2", "features.0"]

    def similarity(method, layer_name):
        ref, _, target = explain_tensor(model, x, method, [model.get_submodule(layer_name)], target=1)
        return np.mean([rank_similarity(ref, explain_tensor(s.model, x, method, [s.model.get_submodule(layer_name)],
                                                            target=target)[0]) for s in steps])

    assert similarity("eigencam", "inp") > 0.99  # the image itself: fails the sanity check
    assert similarity("gradcam", "features.2") < 0.7  # depends on what the weights are


# ------------------------------------------------------------------------ masks
def test_masks_are_cropped_with_the_images_geometry_and_edge_padding(inputs, tmp_path):
    store = PreparedStore.open(inputs["store"])
    rec = store.manifest.iloc[0]
    mask = mask_for(store, 0, inputs["masks"])
    assert mask.shape == (SIZE, SIZE) and mask.dtype == bool
    # By hand: crop side 80 -> 64 px, scale 0.8; source band rows top..top+6, cols 30..130.
    src = np.array(Image.open(inputs["masks"] / rec["file"])) > 0
    rows = np.flatnonzero(src.any(axis=1))
    y0, x0 = int(rec["crop_y0"]), int(rec["crop_x0"])
    expect_top, expect_bottom = (rows[0] - y0) * 0.8, (rows[-1] + 1 - y0) * 0.8
    got = np.flatnonzero(mask.any(axis=1))
    assert abs(got[0] - expect_top) <= 1 and abs(got[-1] + 1 - expect_bottom) <= 1
    assert mask[got[0]].all()  # cols 30..130 cover the whole crop (x0=40 .. 120)
    assert x0 == 40

    # A crop that leaves the source is padded by edge replication, like the image.
    masks = tmp_path / "edge_masks"
    (masks / "C1").mkdir(parents=True)
    edge = np.zeros((SRC_H, SRC_W), np.uint8)
    edge[-4:, :] = 255  # a band on the bottom edge
    Image.fromarray(edge).save(masks / rec["file"])
    frame = store.manifest.copy()
    frame.loc[0, "crop_y0"] = SRC_H - 40  # 40 source rows inside, 40 padded
    padded = PreparedStore(store.root, store.images, frame, store.meta)
    cut = mask_for(padded, 0, masks)
    # 4 real band rows + 40 replicated rows = 44 of 80 -> rows 28.8.. of 64 are inside
    assert cut[:28].sum() == 0 and cut[30:].all()

    full = PreparedStore(store.root, store.images, store.manifest, {**store.meta, "mode": "full"})
    resized = mask_for(full, 0, inputs["masks"])  # full mode: the whole source resized to the stored size
    assert resized.shape == (SIZE, SIZE)
    assert resized.mean() == pytest.approx(src.mean(), abs=0.02)

    with pytest.raises(DataError, match=r"mask not found for image C1/P0001_v1\.png"):
        mask_for(store, 1, masks)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "C1" / "P0001_v1.png")
    with pytest.raises(DataError, match=r"mask is 10x10, its image C1/P0001_v1\.png is 160x96"):
        mask_for(store, 1, masks)


# ------------------------------------------------------------------- the OOF rule
def test_each_image_is_explained_by_the_fold_model_that_never_saw_it(inputs, tmp_path):
    params = cam_params(tmp_path, inputs, per_class=3, perturbation="none")
    make_parent_run(params, inputs["models"])
    run_gradcam(params, log_to_mlflow=False)
    table = pd.read_csv(Path(params.gradcam.out) / "images" / "images.csv")
    store = PreparedStore.open(inputs["store"])
    assert len(table) == 6 and set(table["fold"]) == {0, 1}
    models = {k: load_checkpoint(inputs["models"] / f"fold_{k}") for k in (0, 1)}
    for rec in table.itertuples():
        fold = int(store.manifest.loc[store.manifest["index"] == rec.index, "fold"].iat[0])
        assert rec.fold == fold and rec.checkpoint.endswith(f"fold_{fold}")
        # the image is outside every training set of that model: its training folds are the others
        assert rec.index not in set(store.manifest.loc[store.manifest["fold"] != fold, "index"])
        own = predict_proba(models[fold][0], store.images[[rec.index]], models[fold][1])[0]
        other = predict_proba(models[1 - fold][0], store.images[[rec.index]], models[1 - fold][1])[0]
        assert rec.prob_C3 == pytest.approx(own[1], abs=1e-5) and rec.prob_C3 != pytest.approx(other[1], abs=1e-5)


def test_oof_rule_refuses_a_model_that_may_have_trained_on_the_image(inputs, tmp_path):
    store = PreparedStore.open(inputs["store"])
    cfg = cam_params(tmp_path, inputs).gradcam
    fm = load_fold_model(inputs["models"], 0, store, cfg, "cpu")
    row = int(np.flatnonzero(store.folds == 0)[0])
    assert out_of_fold_model({0: fm}, store, row) is fm
    fm.test_indices.discard(int(store.manifest["index"].iat[row]))  # as if fold 0 had trained on it
    with pytest.raises(DataError, match="refusing to explain it with a model that may have trained on it"):
        out_of_fold_model({0: fm}, store, row)
    other = int(np.flatnonzero(store.folds == 1)[0])
    with pytest.raises(DataError, match="no model for its test fold 1"):
        out_of_fold_model({0: fm}, store, other)

    moved = tmp_path / "models"
    moved.mkdir()
    (moved / "fold_0").symlink_to(inputs["models"] / "fold_1", target_is_directory=True)
    with pytest.raises(DataError, match=r"fold_0/meta\.json: fold is 1, expected 0"):
        load_fold_model(moved, 0, store, cfg, "cpu")


def test_selection_is_seeded_per_class(inputs):
    store = PreparedStore.open(inputs["store"])
    a, b = select_images(store, 2, seed=0), select_images(store, 2, seed=0)
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    assert all(len(v) == 2 and (store.labels[v] == i).all() for i, v in enumerate(a.values()))
    assert [len(v) for v in select_images(store, 99, seed=0).values()] == [4, 4]  # all of a small class


# --------------------------------------------------------------- the stage, end to end
@pytest.mark.slow
def test_stage_writes_and_logs_overlays_and_metrics(inputs, tmp_path):
    from mlflow.tracking import MlflowClient

    params = cam_params(tmp_path, inputs, per_class=2, road_percentiles=[50])
    run_id = make_parent_run(params, inputs["models"])
    assert main(["--params", write_params(params, tmp_path / "params.yaml")]) == 0
    out = Path(params.gradcam.out) / "images"
    metrics = json.loads((out.parent / "metrics.json").read_text())
    table = pd.read_csv(out / "images.csv")
    # the three DVC outputs: images/, metrics.json (an out register reads), headline.json (the DVC metrics)
    assert sorted(p.name for p in out.parent.iterdir()) == ["headline.json", "images", "metrics.json"]
    assert json.loads((out.parent / "headline.json").read_text()) == {
        "cam_in": round(metrics["gradcam_energy_inside_all"], 3),
        "cam_chance": round(metrics["gradcam_area_fraction_all"], 3),
        "cam_pointing": round(metrics["gradcam_pointing_hit_all"], 3),
        "cam_random_sim": round(metrics["gradcam_randomization_similarity_all"], 3)}

    for cls in CLASSES:
        local = sorted(p.name for p in (out / cls).glob("*.png"))
        assert len(local) == 2  # the 2 overlays; the class's contact sheet is in _contact_sheets/ (DVC image plots)
        logged = sorted(Path(f.path).name for f in MlflowClient().list_artifacts(run_id, f"gradcam/{cls}"))
        assert logged == local
        with Image.open(out / cls / local[0]) as img:
            assert img.format == "PNG" and img.size[0] > img.size[1] > 100
    assert sorted(p.name for p in (out / "_contact_sheets").iterdir()) == ["C1.png", "C3.png"]
    assert sorted(Path(f.path).name for f in MlflowClient().list_artifacts(run_id, "gradcam/_contact_sheets")) == [
        "C1.png", "C3.png"]
    assert {Path(f.path).name for f in MlflowClient().list_artifacts(run_id, "gradcam")} >= {
        "metrics.json", "images.csv", "example.png", "C1", "C3", "_contact_sheets"}

    # metrics.json = means of the per-image table, per class and overall, next to the baseline
    assert "gradcam_road_random_all" not in metrics  # 0 in expectation: not computed
    for key in ("energy_inside", "pointing_hit", "pointing_inside", "area_fraction", "road", "randomization_similarity"):
        assert metrics[f"gradcam_{key}_all"] == pytest.approx(table[key].mean())
        for cls in CLASSES:
            assert metrics[f"gradcam_{key}_{cls}"] == pytest.approx(table.loc[table["class"] == cls, key].mean())
    assert metrics["gradcam_n_images_all"] == 4
    assert metrics["gradcam_energy_over_area_all"] == pytest.approx(
        metrics["gradcam_energy_inside_all"] / metrics["gradcam_area_fraction_all"])
    # masks but no mm scale (not the phantom): Zhang et al.'s share of the image side
    assert metrics["gradcam_pointing_tolerance_px_all"] == pytest.approx(ZHANG_TOLERANCE * 64)
    assert "gradcam_pointing_tolerance_mm" not in metrics
    assert (table["pointing_hit"] >= table["pointing_inside"]).all()  # the tolerance only adds hits
    assert table["randomization_similarity"].between(0, 1).all()
    assert all(0 <= v <= 1 for k, v in metrics.items()
               if k.startswith(("gradcam_energy_inside", "gradcam_pointing_hit", "gradcam_pointing_inside")))

    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["gradcam/energy_inside_all"] == pytest.approx(metrics["gradcam_energy_inside_all"])
    assert run.data.metrics["gradcam/seconds_per_image"] > 0
    # the default target layer, stride4: the stage ending at a quarter of the input (test_efficientnet's blocks.1)
    assert run.data.tags["gradcam.method"] == "hirescam" and run.data.tags["gradcam.target_layer"] == "blocks.1"

    # rerun: same selection, same numbers (ROAD's noise is seeded per image)
    run_gradcam(params, log_to_mlflow=False)
    assert json.loads((out.parent / "metrics.json").read_text()) == metrics


def test_stage_without_masks_still_scores_perturbation(inputs, tmp_path):
    params = cam_params(tmp_path, inputs, per_class=1, masks=None, perturbation="confidence_change",
                        method="saliency", target="positive")
    make_parent_run(params, inputs["models"])
    metrics = run_gradcam(params, log_to_mlflow=False)
    assert "gradcam_confidence_change_all" in metrics and "gradcam_confidence_change_random_all" in metrics
    assert not any("energy" in k or "pointing" in k for k in metrics)
    # the same columns in every run: no masks, no localisation figure
    headline = json.loads((Path(params.gradcam.out) / "headline.json").read_text())
    assert headline == {"cam_in": None, "cam_chance": None, "cam_pointing": None,
                        "cam_random_sim": round(metrics["gradcam_randomization_similarity_all"], 3)}
    table = pd.read_csv(Path(params.gradcam.out) / "images" / "images.csv")
    assert (table["explained"] == "C3").all()


def test_stage_errors_name_the_file(inputs, tmp_path, capsys):
    params = cam_params(tmp_path, inputs, masks=str(tmp_path / "nowhere"))
    make_parent_run(params, inputs["models"])
    with pytest.raises(DataError, match=r"gradcam\.masks: folder .*nowhere not found"):
        run_gradcam(params, log_to_mlflow=False)
    assert not Path(params.gradcam.out).exists()  # nothing half-written

    from src.core.cli import run_main

    cv = json.loads((inputs["models"] / "cv.json").read_text())
    (inputs["models"] / "cv.json").write_text(json.dumps({**cv, "parent_run_id": "0" * 32}))
    assert run_main(main, ["--params", write_params(cam_params(tmp_path, inputs), tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"parent run {'0' * 32} is not in the MLflow store" in err


# ---------------------------------------------------------------------- single image
def test_single_image_mode_from_a_file_a_folder_and_a_run_uri(inputs, tmp_path, capsys):
    import mlflow

    from src.core.tracking import configure

    params = cam_params(tmp_path, inputs)
    pfile = write_params(params, tmp_path / "params.yaml")
    image = inputs["images"] / "C3" / "P1000_v1.png"
    store = PreparedStore.open(inputs["store"])
    rec = store.manifest.loc[store.manifest["file"] == "C3/P1000_v1.png"].iloc[0]
    box = f"{rec.box_x},{rec.box_y},{rec.box_w},{rec.box_h}"

    out = tmp_path / "one.png"
    assert main(["--params", pfile, "--image", str(image), "--model", str(inputs["models"] / "fold_0"),
                 "--box", box, "--out", str(out)]) == 0
    assert out.is_file() and "predicted" in capsys.readouterr().out
    # the same preprocessing as training: probabilities equal the stored crop's
    model, meta = load_checkpoint(inputs["models"] / "fold_0")
    expected = predict_proba(model, store.images[[int(rec["index"])]], meta)[0]
    from src.explain.oof_explain import explain_file

    result = explain_file(params, image, tmp_path / "two.png", str(inputs["models"] / "fold_0"),
                          (rec.box_x, rec.box_y, rec.box_w, rec.box_h))
    assert result["probs"]["C3"] == pytest.approx(expected[1], abs=2e-3)
    assert result["cam"].shape == (SIZE, SIZE) and 0 <= result["cam"].min() and result["cam"].max() <= 1

    # default --model: every fold of train.out, probabilities averaged
    ens = explain_file(params, image, tmp_path / "three.png", None, (rec.box_x, rec.box_y, rec.box_w, rec.box_h))
    assert len(ens["models"]) == 2
    folds = [load_checkpoint(inputs["models"] / f"fold_{k}") for k in (0, 1)]
    mean_probs = np.mean([predict_proba(m, ens["image"][None], meta)[0] for m, meta in folds], axis=0)
    assert ens["probs"]["C3"] == pytest.approx(mean_probs[1], abs=1e-5)
    target = int(np.argmax(mean_probs))
    cfg = params.gradcam
    maps = [explain_image(m, meta, ens["image"], cfg.method, cfg.target_layer, target=target)[0] for m, meta in folds]
    np.testing.assert_allclose(ens["cam"], np.mean(maps, axis=0) / np.mean(maps, axis=0).max(), atol=1e-5)

    # an MLflow URI (the registry's models:/ URIs resolve the same way through src.serving.pyfunc_model)
    configure(params.mlflow)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(inputs["models"] / "fold_0"), artifact_path="checkpoint")
    uri = explain_file(params, image, tmp_path / "four.png", f"runs:/{run.info.run_id}/checkpoint",
                       (rec.box_x, rec.box_y, rec.box_w, rec.box_h))
    assert uri["probs"]["C3"] == pytest.approx(result["probs"]["C3"], abs=1e-6)
    np.testing.assert_allclose(uri["cam"], result["cam"], atol=1e-6)

    from src.core.cli import run_main

    assert run_main(main, ["--params", pfile, "--image", str(image), "--out", str(tmp_path / "x.png")]) == 2
    assert "pass --box x,y,w,h" in capsys.readouterr().err
    assert run_main(main, ["--params", pfile, "--image", str(image), "--box", "1,2,3", "--out", "x.png"]) == 2
    assert "--box '1,2,3': expected x,y,w,h" in capsys.readouterr().err


def test_save_overlay_writes_a_png(tmp_path):
    path = save_overlay(tmp_path / "sub" / "o.png", np.zeros((32, 48), np.uint8), np.ones((32, 48), np.float32),
                        pred_class="C3", prob=0.9, true_class="C1")
    with Image.open(path) as img:
        assert img.format == "PNG"
    assert not list((tmp_path / "sub").glob(".*tmp*"))  # no temporary left behind


def test_contact_sheet_title_and_captions_never_overlap_the_images(tmp_path):
    """The title, each panel's caption and the images sit in bands of their own, whatever the
    number of panels, caption lines or title length (they used to run into each other)."""
    from src.core.plotting import pyplot

    rng = np.random.default_rng(0)
    image, cam = (rng.random((40, 40)) * 255).astype(np.uint8), rng.random((40, 40)).astype(np.float32)
    cases = [
        ([f"P{i:04d}_v1\ntrue C1 | predicted C3 (p=0.85)" for i in range(7)], "C1: 7 random images, gradcam, "
         "each by its out-of-fold model"),
        (["a_very_long_file_name_exported_by_the_hospital_pacs_0001\ntrue osteoporotic | predicted healthy (p=0.51)"]
         * 2, "osteoporotic: 2 random images, gradcam, each by its out-of-fold model, with a title this long"),
        (["one line"], "gradcam: one image per class"),
    ]
    for labels, title in cases:
        fig = contact_sheet([SheetItem(image, cam, label) for label in labels], title)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        whole = fig.bbox
        suptitle = fig._suptitle.get_window_extent(renderer)
        panels = [ax for ax in fig.axes if ax.images]
        boxes = [ax.get_window_extent(renderer) for ax in panels]
        captions = [ax.title.get_window_extent(renderer) for ax in panels]
        assert len(panels) == len(labels)
        for box in [suptitle, *captions, *boxes]:
            assert whole.x0 - 1 <= box.x0 and box.x1 <= whole.x1 + 1
            assert whole.y0 - 1 <= box.y0 and box.y1 <= whole.y1 + 1
        for i, caption in enumerate(captions):
            assert not caption.overlaps(suptitle), (title, i)
            assert not any(caption.overlaps(box) for box in boxes), (title, i)
            assert not any(caption.overlaps(other) for j, other in enumerate(captions) if j != i), (title, i)
        assert not any(suptitle.overlaps(box) for box in boxes)
        pyplot().close(fig)
    path = save_contact_sheet(tmp_path / "sheet.png", [SheetItem(image, cam, "x")], "t")
    with Image.open(path) as img:
        assert img.format == "PNG"


def test_figures_outline_the_mask_else_the_crop_box():
    """Where the answer should be: the phantom's cortex outline, else (real data) the annotated box."""
    from matplotlib.patches import Rectangle

    from src.core.plotting import pyplot

    rng = np.random.default_rng(0)
    image, cam = (rng.random((40, 40)) * 255).astype(np.uint8), rng.random((40, 40)).astype(np.float32)
    mask = np.zeros((40, 40), bool)
    mask[20:24, 5:35] = True
    items = [SheetItem(image, cam, "mask", mask=mask), SheetItem(image, cam, "box", box=(5.0, 20.0, 30.0, 4.0)),
             SheetItem(image, cam, "neither")]
    fig = contact_sheet(items, "outlines")
    panels = [ax for ax in fig.axes if ax.images]
    rectangles = [[p for p in ax.patches if isinstance(p, Rectangle)] for ax in panels]
    assert len(panels[0].collections) >= 1 and not rectangles[0]  # a contour, no box
    assert not panels[1].collections and len(rectangles[1]) == 1
    assert rectangles[1][0].get_width() == 30.0 and rectangles[1][0].get_xy() == (4.5, 19.5)  # pixel edges
    assert not panels[2].collections and not rectangles[2]
    pyplot().close(fig)
