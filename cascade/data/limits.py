"""Size limits of an input image, light to import (``--help`` reads them without pydicom)."""

MAX_SIDE = 16384
"""Largest accepted image side in pixels; anything bigger is a corrupt header, not a radiograph."""

MAX_PIXELS = 5000 * 5000
"""Default pixel budget of one image: Rows x Columns x SamplesPerPixel x frames, checked from the header (and
from the compressed stream's own size fields) before any decoder allocates, so a few-kilobyte compressed "bomb"
declaring 16384 x 16384 is refused instead of costing gigabytes. 25 million pixels covers the largest real
radiographs (a 43 x 43 cm detector at 100 um is 4,300 x 4,300; stitched long-leg films about 3,000 x 7,000); the
memory one decode needs is in docs/robustness.md. ``--max-pixels`` / ``max_pixels=`` change it."""
