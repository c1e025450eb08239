"""Imported at the start of every process the tests start (tests/conftest.py puts this folder on
their PYTHONPATH): torch is hidden from servers, CLI commands and README examples, as after a plain
`pip install jaxserve`, which has no torch. It serves only the tests' own oracles, in the pytest
processes; with it installed, transformers imports torch and, from AutoTokenizer's config lookup,
torch.distributed, 3-4 s of CPU in each process that loads a tokenizer."""

import sys

sys.modules.setdefault("torch", None)  # `import torch` raises ImportError; find_spec("torch") is None
