"""Shared pytest settings: hypothesis runs a fixed, derandomized set of examples,
so that a CI failure can be reproduced by running the same command again."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "bnnorm",
    derandomize=True,
    deadline=None,
    max_examples=int(os.environ.get("BNNORM_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("bnnorm")
