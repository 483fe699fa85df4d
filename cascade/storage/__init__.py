"""What is written to and read from disk: the model folder (``modeldir``) and its card (``model_card``), safe paths and
atomic writes (``fileio``), the audit log (``audit``)."""
