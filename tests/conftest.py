"""Test-wide setup: eight fake CPU devices, so the sharding tests can build a mesh.

The flag must be set before JAX initialises its backends; pytest imports this file
first. Single-device tests are unaffected (arrays land on device 0).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
