"""fingerprint_lm."""

from fingerprint_lm.config_schema import register_config_schemas
from fingerprint_lm.resolvers import register_resolvers

register_resolvers()  # configs interpolate ${fingerprint_lm.*:} (conf/logger/wandb.yaml)
register_config_schemas()  # conf/<group>/*.yaml extend /schema/<group>, conf/data/<source>.yaml /schema/data_<source>
