"""fingerprint_lm."""

from fingerprint_lm.resolvers import register_resolvers

register_resolvers()  # configs interpolate ${fingerprint_lm.*:} (conf/logger/wandb.yaml)
