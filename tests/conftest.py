"""Shared test settings."""

import os

from hypothesis import settings

# These machines are shared and noisy: per-example deadlines would fail on timing, not on
# behaviour. CI derandomizes so a landing never hinges on a lucky draw; locally each run
# explores new examples.
settings.register_profile("local", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "local")
