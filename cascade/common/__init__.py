"""Small helpers every layer may use: user-facing messages (``messages``), child processes that die with their parent
(``processes``) and progress bars (``progress``)."""
