"""The coarse-to-fine step of the localiser (issue 16): windows cut from the finer view, peaks
mapped back to overview pixels, a refiner that learns to undo a coarse error on the phantom,
and the fold folder that carries both networks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src.core.config import LocateParams
from src.core.errors import BoneHealthError
from src.data.imaging import read_image
from src.localise.artifact import LocaliserMeta, load_localiser, save_localiser
from src.localise.heatmap import Peak
from src.localise.network import Localiser
from src.localise.overview import overview
from src.localise.refine import FineView, cut_window, refine_peaks, train_refiner
from tests.test_localise import _BrightPixelDetector

BACKBONE = "mobilenetv3_small_050"


def test_cut_window_repeats_edge_pixels_beyond_the_image():
    fine = np.arange(8 * 12, dtype=np.uint8).reshape(8, 12)
    inside, corner = cut_window(fine, (6.0, 4.0), (4, 6))
    assert corner == (3, 2) and (inside == fine[2:6, 3:9]).all()
    edge, corner = cut_window(fine, (0.0, 0.0), (4, 6))
    assert corner == (-3, -2) and edge.shape == (4, 6)
    assert (edge[:2, :3] == fine[0, 0]).all()          # beyond the corner: the corner pixel
    assert (edge[2:, 3:] == fine[:2, :3]).all()         # inside: the image itself
    assert (edge[2:, 0] == fine[:2, 0]).all()           # beyond the left edge: the edge column


def test_refine_peaks_moves_both_centres_to_the_refiners_peak_in_overview_pixels():
    """A perfect detector of the brightest pixel as the refiner: each peak (one per half, both
    off by several pixels) lands on its dot, mapped from the finer view (2x) back to the
    overview; size and confidence stay the coarse peak's."""
    fine = np.zeros((1, 64, 128), dtype=np.uint8)
    dots = [(21, 30), (40, 97)]                          # (y, x) in the finer view, one per half
    for y, x in dots:
        fine[0, y, x] = 255
    coarse = (Peak(x=13.0, y=8.0, w=6.0, h=4.0, confidence=0.7), Peak(x=51.0, y=23.0, w=5.0, h=3.0, confidence=0.4))
    view = FineView(size=(64, 128), window=(32, 48), jitter=0.13)
    (best, other), = refine_peaks([_BrightPixelDetector()], fine, [coarse], (32, 64), view)
    for peak, before, (y, x) in zip((best, other), coarse, dots):
        assert (peak.x, peak.y) == pytest.approx(((x + 0.5) / 2, (y + 0.5) / 2), abs=1e-4)
        assert (peak.w, peak.h, peak.confidence) == (before.w, before.h, before.confidence)


def test_refiner_learns_to_undo_a_coarse_error_on_the_phantom(tmp_path):
    """Trained on two thirds of a tiny phantom, the refiner brings peaks put 10 finer-view pixels
    (~6 mm) off the true centre of the held-out images back to under half that error."""
    from src.core.config import PhantomParams
    from src.synthetic.generator import generate

    p = PhantomParams(out=str(tmp_path / "phantom"), masks_out=str(tmp_path / "masks"), width=512, height=256,
                      patients_per_class=40, followup_fraction=0.0, seed=5)
    generate(p)
    import pandas as pd

    m = pd.read_csv(tmp_path / "phantom" / "manifest.csv")
    cfg = LocateParams(model=BACKBONE, threads=1, batch_size=8,
                       refine={"size": (256, 512), "window": (64, 96), "epochs": 60})
    fines = np.stack([overview(read_image(tmp_path / "phantom" / f), cfg.refine.size) for f in m["file"]])
    boxes = m[["box_x", "box_y", "box_w", "box_h"]].to_numpy(np.float64)   # the finer view is the source size
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    rng = np.random.default_rng(0)
    order = rng.permutation(len(m))
    train, test = order[: 2 * len(m) // 3], order[2 * len(m) // 3:]
    refiner = train_refiner(fines[train], centres[train], boxes[train, 2:], cfg, seed=0)

    angle = rng.uniform(0, 2 * np.pi, len(test))
    off = 10.0 * np.column_stack([np.cos(angle), np.sin(angle)])
    # the overview is the finer view itself here (scale 1), so peaks are in finer-view pixels
    coarse = [(Peak(x=cx, y=cy, w=10.0, h=5.0, confidence=0.5),) * 2 for cx, cy in centres[test] + off]
    refined = refine_peaks([refiner], fines[test], coarse, cfg.refine.size, FineView.of(cfg.refine))
    error = np.hypot(*(np.array([[b.x, b.y] for b, _ in refined]) - centres[test]).T)
    assert np.median(error) < 5.0, f"median error {np.median(error):.1f} px after refining peaks 10 px off"


def test_a_localiser_folder_carries_its_refiner_and_refuses_mismatched_weights(tmp_path):
    torch.manual_seed(0)
    model, refiner = Localiser(BACKBONE), Localiser(BACKBONE)
    refined = LocaliserMeta(model=BACKBONE, size=[96, 192], min_confidence=0.2,
                            refine={"size": [256, 512], "window": [64, 96], "jitter": 0.13})
    save_localiser(tmp_path / "both", model.state_dict(), refined, refiner.state_dict())
    got, got_refiner, meta = load_localiser(tmp_path / "both")
    assert meta.fine_view() == FineView((256, 512), (64, 96), 0.13)
    for a, b in ((model, got), (refiner, got_refiner)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    plain = LocaliserMeta(model=BACKBONE, size=[96, 192], min_confidence=0.2)
    save_localiser(tmp_path / "coarse", model.state_dict(), plain)      # what earlier locate runs wrote
    assert load_localiser(tmp_path / "coarse")[1] is None
    with pytest.raises(BoneHealthError, match="a refiner needs its view in meta.refine"):
        save_localiser(tmp_path / "bad", model.state_dict(), plain, refiner.state_dict())
    (tmp_path / "coarse" / "meta.json").write_text((tmp_path / "both" / "meta.json").read_text())
    with pytest.raises(BoneHealthError) as exc:
        load_localiser(tmp_path / "coarse")
    assert str(exc.value).startswith(f"{tmp_path / 'coarse' / 'localiser.pt'}: cannot load the localiser "
                                     "(expected the weights of localiser and refiner")
    assert "\n" not in str(exc.value)
    refined.refine = {"size": [256, 512], "window": [64, 96]}
    with pytest.raises(BoneHealthError, match="refine .*; expected size, window and jitter"):
        refined.fine_view()


class _TwoPeaks(torch.nn.Module):
    """Every window, mirror-symmetric (the test-time flip keeps it): the top corners slightly more
    likely (logit 2.5) than the four cells at the window centre (logit 2); offsets 0.5, sizes 1."""

    def forward(self, x):
        h, w = x.shape[2] // 4, x.shape[3] // 4
        out = torch.zeros(len(x), 5, h, w)
        out[:, 0] = -9.0
        out[:, 0, 0, 0] = out[:, 0, 0, w - 1] = 2.5
        out[:, 0, h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1] = 2.0
        out[:, 1:3] = 0.5
        return out


def test_the_prior_prefers_the_peak_near_the_window_centre_where_the_refiner_was_trained():
    view = FineView(size=(64, 128), window=(32, 48), jitter=0.13)
    prior = view.prior()
    assert prior.shape == (8, 12) and prior.max() == pytest.approx(np.exp(-0.5 * ((2 / 4.16) ** 2 + (2 / 6.24) ** 2)))
    assert prior[3:5, 5:7].min() == prior.max() and prior[0, 0] < 1e-4 * prior.max()   # centred, symmetric
    fine = np.zeros((1, 64, 128), dtype=np.uint8)
    coarse = (Peak(x=16.0, y=8.0, w=6.0, h=4.0, confidence=0.7),) * 2
    # the window's corner is (8, 0) in the finer view (2x the overview); cell (row 3, col 5) is
    # the first of the central four, its centre at (5.5 * 4, 3.5 * 4) in the window
    (best, _), = refine_peaks([_TwoPeaks()], fine, [coarse], (32, 64), view)
    assert (best.x, best.y) == pytest.approx(((8 + 22.0) / 2, (0 + 14.0) / 2))
    (flat, _), = refine_peaks([_TwoPeaks()], fine, [coarse], (32, 64), FineView((64, 128), (32, 48), 0.0))
    assert (flat.x, flat.y) == pytest.approx(((8 + 2.0) / 2, (0 + 2.0) / 2))   # no prior: the corner
