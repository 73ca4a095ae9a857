"""Synthetic faces written in the CelebAMask-HQ layout, so the real loader runs without a download.

A face is a handful of parametric shapes (face oval, ears, neck, clothes, hair in several styles,
brows, eyes, nose, lips, open or closed mouth; glasses, hat, earrings and necklace on some faces)
rasterised at the label level, then an image is rendered from the label map with per-face colours,
shading and texture. Geometry and appearance come from two independent random streams seeded by
``(seed, index)``, so face ``i`` is the same whatever ``n`` or the number of workers, and the same
geometry can be rendered with different looks.

Shapes live in face-local coordinates: ``u`` across the face and ``v`` downwards, in units of the
face's half width, centred on the face and rotated with the head tilt. Neck and clothes use the same
units without the tilt (the body stays upright). Every shape is an inequality on a grid of pixel
centres, so the image (``size`` px) and the masks (``size / 2`` px, as in CelebAMask-HQ) are
rasterisations of the same geometry. ``l_`` parts (eye, brow, ear) lie on the image's left.

Layout written (``i`` the face index, ``part`` one of :data:`bench.data.PART_NAMES`)::

    DIR/CelebA-HQ-img/{i}.jpg                                     size x size RGB
    DIR/CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png    size/2 binary 0/255, one per part present
    DIR/synth.json                                                manifest: n, size, seed, generator version
"""
from bench.synth.geometry import Geometry, sample_geometry
from bench.synth.writer import (
                                GENERATOR_VERSION,
                                MANIFEST_NAME,
                                Manifest,
                                SynthFace,
                                default_set_dir,
                                default_workers,
                                ensure_default_set,
                                ensure_synthetic,
                                generate_synthetic,
                                make_face,
                                read_manifest,
                                wait_for_default_set,
)

__all__ = ["GENERATOR_VERSION", "MANIFEST_NAME", "Geometry", "Manifest", "SynthFace", "default_set_dir",
           "default_workers", "ensure_default_set", "ensure_synthetic", "generate_synthetic", "make_face",
           "read_manifest", "sample_geometry", "wait_for_default_set"]
