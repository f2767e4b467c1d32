import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official_checkpoints"
sys.path.insert(0, str(ROOT))

needs_official = pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"authors' checkpoints not found at {OFFICIAL}")
