"""Settings refuse an upstream that one of the proxy's own listeners receives."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxy.config import Settings, listener_receives
from proxy.errors import ConfigError

LOOPS = [
    ("127.0.0.1:53", "127.0.0.1:53"),
    ("127.0.0.1:53", "127.0.0.1"),  # the default port
    ("0.0.0.0:53", "127.0.0.1"),
    ("0.0.0.0:53", "127.0.0.53:53"),  # all of 127.0.0.0/8 is this machine
    ("0.0.0.0:53", "0.0.0.0:53"),
    ("127.0.0.1:53", "0.0.0.0:53"),  # sent to loopback
    ("[::]:53", "127.0.0.1:53"),  # UDP on [::] takes IPv4 too
    ("[::]:53", "[::1]:53"),
    ("[::1]:53", "[::1]:53"),
    ("127.0.0.1:53", "[::ffff:127.0.0.1]:53"),
]
NOT_LOOPS = [
    ("127.0.0.1:53", "127.0.0.2:53"),  # another address, a listener on one address
    ("127.0.0.1:5353", "127.0.0.1:53"),  # another port
    ("0.0.0.0:53", "192.0.2.1:53"),  # not an address of this machine
    ("0.0.0.0:53", "[::1]:53"),  # an IPv4 wildcard does not take IPv6
    ("127.0.0.1:0", "127.0.0.1:0"),  # port 0: known at bind time only (the probes' job)
]


@pytest.mark.parametrize(("listen", "upstream"), LOOPS)
def test_loop_is_refused(listen: str, upstream: str) -> None:
    assert listener_receives(listen, upstream)
    with pytest.raises(ValidationError, match="own listener .*would loop"):
        Settings(listen=[listen, "127.0.0.1:9"], upstreams=["127.0.0.1:10", upstream])


@pytest.mark.parametrize(("listen", "upstream"), NOT_LOOPS)
def test_no_loop_is_accepted(listen: str, upstream: str) -> None:
    assert not listener_receives(listen, upstream)
    assert Settings(listen=[listen], upstreams=[upstream]).upstreams


def test_resolv_conf_skips_the_proxy_itself(tmp_path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nnameserver 127.0.0.53\n")
    with pytest.raises(ConfigError, match="besides this proxy"):
        Settings(listen=["0.0.0.0:53"]).with_resolv_conf(str(resolv))
    found = Settings(listen=["127.0.0.1:53"]).with_resolv_conf(str(resolv))
    assert found.upstreams == ["127.0.0.53:53"]
