"""fingerprint_lm."""
