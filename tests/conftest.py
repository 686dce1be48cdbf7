"""Shared test configuration: hypothesis profiles and the real-data location."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "ci": deterministic and bounded, so the suite fits the CI budget on 2 cores.
# "dev": more examples for local bug hunting. Select with HYPOTHESIS_PROFILE.
settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
