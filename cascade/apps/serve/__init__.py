"""``cascade serve``: the cascade as a web service (FastAPI + uvicorn): REST API, web page, DICOM SEG, metrics.

Needs the ``serve`` extra (``pip install "pneumothorax-cascade[serve]"``).
"""

from cascade.apps.serve.app import create_app

__all__ = ["create_app"]
