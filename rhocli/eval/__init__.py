"""``rho eval``: few-shot GSM8K / MATH accuracy by generation (chain of thought, PAL, tool-integrated)."""
