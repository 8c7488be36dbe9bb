"""flexsfl.deploy.ssh: destinations parse, and what could reach a shell or ssh as an option is refused."""

from __future__ import annotations

import re

import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.deploy.ssh import Remote


@pytest.mark.parametrize(
    "dest, host, user, directory",
    [
        ("pi@raspberrypi", "raspberrypi", "pi", "flexsfl"),
        ("pi@10.0.0.7:/opt/flexsfl", "10.0.0.7", "pi", "/opt/flexsfl"),
        ("jetson:models/a", "jetson", None, "models/a"),
        ("root@[fe80::1%eth0]:~/x", "fe80::1%eth0", "root", "~/x"),
    ],
)
def test_destination_parses(dest, host, user, directory):
    r = Remote.parse(dest)
    assert (r.host, r.user, r.directory) == (host, user, directory)
    assert Remote.parse(str(r)) == r


@pytest.mark.parametrize(
    "dest, kw, fragment",
    [
        ("-oProxyCommand=touch /tmp/x@host", {}, "bad user name"),
        ("pi@-oProxyCommand=x", {}, "bad host"),
        ("pi@host:dir with space", {}, "device directory"),
        ("pi@host:$(reboot)", {}, "device directory"),
        ("pi@host", {"port": 70000}, "--port"),
        ("pi@host", {"ssh_options": ("-F/tmp/cfg",)}, "Key=Value"),
    ],
)
def test_destination_refuses_what_could_reach_a_shell_or_ssh(dest, kw, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Remote.parse(dest, **kw)

