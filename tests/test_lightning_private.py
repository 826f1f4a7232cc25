"""Lightning's private API, used in one shim (kws_lightning/utils/lightning_private.py): every name it
needs exists on the installed Lightning, and no other module reaches into Lightning's internals."""

from __future__ import annotations

import re
from pathlib import Path

from training_helpers import make_trainer

from kws_lightning.utils.lightning_private import PRIVATE_NAMES, missing_private_names

PACKAGE = Path(__file__).resolve().parents[1] / "kws_lightning"
SHIM = PACKAGE / "utils" / "lightning_private.py"
# A private attribute of a Lightning object, or a private name imported from Lightning.
PRIVATE_USE = re.compile(
    r"\b(?:trainer|fit_loop|epoch_loop|val_loop|loop|strategy|launcher|connector|logger_connector)\._[a-z]\w*"
    r"|from (?:pytorch_)?lightning\S* import .*\b_[A-Za-z]\w*"
)


def test_every_private_name_the_shim_uses_exists(tmp_path: Path) -> None:
    """An upgrade of Lightning that drops or renames one fails here, naming it (pyproject.toml pins the
    tested minor; raise the pin only with this test passing)."""
    assert missing_private_names(make_trainer(tmp_path)) == []
    # ... and the table it checks lists every private name the shim's functions use.
    code = SHIM.read_text().split("def missing_private_names", 1)[1]
    used = {a or b for a, b in re.findall(r"\.(_[a-z]\w*)|\b(_[A-Z]\w*)", code)}
    assert used == {name for names in PRIVATE_NAMES.values() for name in names}


def test_no_other_module_touches_lightning_internals() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != SHIM
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if PRIVATE_USE.search(line)
    ]
    assert offenders == [], "use kws_lightning/utils/lightning_private.py instead:\n" + "\n".join(offenders)
