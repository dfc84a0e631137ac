"""The image policy: the limits on what an image may be, for training data and for serving.

Both the audit (:func:`carclf.data.scan.check_image`) and the Serve ingress
(:func:`serve.images.decode_image`) read an image's header first and refuse it before the full
decode, so that a decompression bomb never reaches the decoder. They take different pixel limits
on purpose:

* ``AUDIT_MAX_PIXELS`` (64 M) is for a training set's files. Each is decoded once, offline, by a
  job that has chosen to read that data set, so the large photos found in offline data sets
  (a 50-megapixel camera image, say) are accepted.
* ``SERVE_MAX_PIXELS`` (40 M) is for HTTP requests. Every request is decoded in the ingress, and
  several at once, so the bound on memory per request is tighter.

The other serving limits refuse what the ingress should not decode: a side under ``SERVE_MIN_SIDE``
pixels or an aspect ratio over ``SERVE_MAX_ASPECT``:1 (nothing a classifier can read once resized
to its input), or over ``SERVE_MAX_TEXT_BYTES`` of text metadata (PNG text chunks, EXIF, ICC
profiles), which would be held in memory beside the pixels. The audit does not apply them: it keeps
whatever training's loader can load, and its report shows the sizes. The HTTP limits (body
size, content types) are not image policy and stay with the ingress.
"""

from __future__ import annotations

# Formats (Pillow's names): training data may come in any format training's loader reads;
# a client sends the web's formats (the ones the API documents).
AUDIT_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
SERVE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")

# A training set's file is decoded once, offline: large photos from offline data sets pass.
# The audit records this limit in the manifest's settings, so changing it makes an earlier
# manifest unusable until it is rebuilt with ``--force``.
AUDIT_MAX_PIXELS = 64_000_000
# Every request is decoded in the ingress, several at once: a tighter bound on memory.
SERVE_MAX_PIXELS = 40_000_000
SERVE_MIN_SIDE = 8
SERVE_MAX_ASPECT = 20.0
SERVE_MAX_TEXT_BYTES = 1 << 20
