"""``rho score``: ``--model`` and options -> a ``ScoreJob`` (``spec``), and one rank's run (``rank``)."""
