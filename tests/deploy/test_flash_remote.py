"""flexsfl.deploy.flash_remote runs on the device's own python3: it must parse there."""

from __future__ import annotations

import ast
import pathlib

from flexsfl.deploy import flash_remote


def test_device_script_stays_within_python_3_6_syntax():
    # The probe must run on an old python3 to say it is too old, not die of a SyntaxError.
    ast.parse(pathlib.Path(flash_remote.__file__).read_text(), feature_version=(3, 6))

