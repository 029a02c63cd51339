"""``rho train``: options -> a validated ``RunSpec`` (``spec``), and one rank's run (``rank``)."""
