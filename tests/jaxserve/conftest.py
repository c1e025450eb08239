"""Tests of the jaxserve package, in folders that mirror its sub-packages. The shared
fixtures (engine_fixtures, grpc_fixtures, http_helpers) live here and are importable from
every folder below."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
