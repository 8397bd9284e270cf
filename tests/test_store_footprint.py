"""What opening a store loads into a process (the daemon keeps it for good): sqlite_utils only
when a migration runs, and never pandas on its account. Real files, fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

OPEN = """
import json, sys
from tuned.store.database import Store
Store(sys.argv[1]).close()
print(json.dumps({m: m in sys.modules for m in ("sqlite_utils", "pandas")}))
"""


def _open_in_fresh_process(db: Path, pythonpath: Path) -> dict[str, bool]:
    """Open the store at `db` in a new interpreter with `pythonpath` first on its path;
    which of sqlite_utils and pandas it then has loaded."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([sys.executable, "-c", OPEN, str(db)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_store_loads_sqlite_utils_to_migrate_only_and_never_pandas(tmp_path):
    # A stand-in pandas that any import would load: the test holds whether or not the real
    # one is installed here.
    fake = tmp_path / "path"
    (fake / "pandas").mkdir(parents=True)
    (fake / "pandas" / "__init__.py").write_text("Timestamp = object\n")
    db = tmp_path / "t.db"
    assert _open_in_fresh_process(db, fake) == {"sqlite_utils": True, "pandas": False}
    assert _open_in_fresh_process(db, fake) == {"sqlite_utils": False, "pandas": False}


def test_pandas_imported_before_stays_usable_for_sqlite_utils(tmp_path):
    """A process that had pandas already gets sqlite_utils as usual (with pandas)."""
    fake = tmp_path / "path"
    (fake / "pandas").mkdir(parents=True)
    (fake / "pandas" / "__init__.py").write_text("Timestamp = object\n")
    code = ("import sys, pandas\nfrom tuned.store.database import Store\n"
            "Store(sys.argv[1]).close()\nimport sqlite_utils.db\n"
            "print(sqlite_utils.db.pd is pandas)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(fake), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.db")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
