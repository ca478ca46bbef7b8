"""Part of step 1 (image -> pixels): a photo's colours in sRGB, whatever colour space its file declares.

Phones and cameras store many photos in a wider space than sRGB and say so with an embedded ICC profile: an
iPhone's HEIC and JPEG photos are Display P3, a camera set to Adobe RGB writes that. Read as if they were sRGB
(as Pillow does) their colours are washed out: P3's
red (200, 50, 50) is sRGB (218, 24, 40), and a CNN trained on sRGB photos (ImageNet's, Flickr8k's:
none of Flickr8k's photos carries a profile) sees the wrong colours. ``to_srgb`` converts them with LittleCMS (in
Pillow), as a browser or a photo viewer does before showing them.
"""

from __future__ import annotations

import functools
import io

from PIL import Image, ImageCms

# an embedded sRGB profile (cameras' "sRGB IEC61966-2.1", Pillow's "sRGB built-in") needs no conversion
SRGB_NAMES = ("srgb",)


@functools.lru_cache(maxsize=16)
def _transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    """The RGB -> sRGB transform of an embedded profile, built once per profile (7 ms); None when the profile is
    sRGB's, is not an RGB one (a grey or CMYK photo's), or cannot be used. A damaged profile is
    ignored, as browsers do, rather than making the photo unreadable. NOCACHE: lcms's one-pixel cache is not
    thread-safe, and ``ImageFiles`` converts a batch's photos on several threads with the same transform."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if space != "RGB" or ImageCms.getProfileDescription(profile).strip().lower().startswith(SRGB_NAMES):
            return None
        return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), "RGB", "RGB",
                                       renderingIntent=ImageCms.Intent.PERCEPTUAL, flags=ImageCms.Flags.NOCACHE)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def needs_conversion(img: Image.Image, icc: bytes | None) -> bool:
    """Whether ``to_srgb`` would change ``img``: an RGB image whose ``icc`` profile is an RGB space other than sRGB."""
    return bool(icc) and img.mode == "RGB" and _transform(bytes(icc)) is not None


def to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """An RGB ``img`` converted from the colour space of its ``icc`` profile to sRGB. Without a profile, with
    sRGB's, or with one that cannot be used, ``img`` is returned as it is: taken to be sRGB, as the web does.
    Cost: ~47 ns a pixel here (9 ms for 500x375 noise, less for photos), which is why ``load_image`` converts
    after reducing."""
    if not needs_conversion(img, icc):
        return img
    return ImageCms.applyTransform(img, _transform(bytes(icc)))
