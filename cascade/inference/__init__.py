"""What runs a model: the cascade itself (``pipeline``), how it runs (``runtime``: device, precision, engine), the
engines (``engines/``), batch prediction over files (``predicting``, split across ranks by ``sharding``), and the
graphs some engines run (``onnx_export``, ``quantize``).

Nothing is imported here, so that importing a submodule imports only what it needs (torch stays out of
``import cascade``)."""
