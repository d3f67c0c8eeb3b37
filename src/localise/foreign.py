"""How confident the localiser is on images that hold no mandible: the other side of
locate.min_confidence.  scikit-image's bundled sample images (no download): a CT head phantom,
a retinal photograph, a photograph, the moon, coins, text; and frames a broken upload gives:
black, mid grey, noise.  A real non-dental radiograph (a knee, a chest) is not among them:
metrics.json reports each one so a user can judge the threshold on their own."""
from __future__ import annotations

import numpy as np

from src.localise.fit import find_centres
from src.localise.overview import overview


def foreign_images() -> dict[str, np.ndarray]:
    import skimage.data as sk
    from skimage.color import rgb2gray

    rng = np.random.default_rng(0)
    out = {"ct_head_phantom": sk.shepp_logan_phantom(), "retina": rgb2gray(sk.retina()),
           "camera": sk.camera() / 255.0, "moon": sk.moon() / 255.0, "coins": sk.coins() / 255.0,
           "text": sk.text() / 255.0, "black": np.zeros((512, 1024)), "grey": np.full((512, 1024), 0.5),
           "noise": rng.random((512, 1024))}
    return {k: np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0) for k, v in out.items()}


def foreign_confidences(models, size: tuple[int, int]) -> dict[str, float]:
    """Best-peak confidence of the fold ensemble on each foreign image."""
    images = foreign_images()
    views = np.stack([overview(img, size) for img in images.values()])
    return {name: float(best.confidence) for name, (best, _) in zip(images, find_centres(models, views))}
