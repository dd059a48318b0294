"""The test suite; this module runs before conftest and every test module."""

import os as _os

# Before anything imports ddserve.settings: the suite sees neither the developer's `.env` nor their
# DDSERVE_* variables, only what each test sets.
for _name in [n for n in _os.environ if n.startswith("DDSERVE_")]:
    del _os.environ[_name]
_os.environ["DDSERVE_ENV_FILE"] = ""
