"""Where the repository and its shipped inputs are, found from this file.

One definition, so moving a module never silently changes what ``REPO_ROOT`` means.
"""

from __future__ import annotations

from pathlib import Path

#: The checkout: the folder holding ``common/``, ``models/``, ``data/`` and ``targets/``.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The pictures shipped for vision-language calibration and checks (``data/images``).
IMAGES_DIR = REPO_ROOT / "data" / "images"
