"""Writers of prediction outputs other than the submission CSV (one module per format)."""
