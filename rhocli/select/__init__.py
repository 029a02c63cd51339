"""``rho select``: offline token selection into a mask store (``selection``), and its HTML report."""
