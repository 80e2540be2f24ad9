"""The media path: an image source becomes a decoded, size-capped Pillow image.

``loader`` (MediaLoader: retries, cache, one entry point) uses ``fetch`` (http(s), with the
address policy in ``addresses`` and pinned sockets in ``sockets``), ``s3`` (s3:// sources) and
``decode`` (data: URIs, hostile bytes, format allowlist, pixel caps)."""
