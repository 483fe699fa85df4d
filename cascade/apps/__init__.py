"""The applications built on the library: the demo (``demo``), the web service (``serve/``) and the DICOM node
(``listen/``). The command line (:mod:`cascade.cli`) starts them."""
