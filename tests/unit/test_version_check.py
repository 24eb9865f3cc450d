"""The handshake's version rule: the same release (major.minor) pairs; anything else is refused naming both."""

from __future__ import annotations

import pytest

from mirrord import __version__
from mirrord.errors import HandshakeRefused
from mirrord.replication import link

SIZE = 1 << 20


def hello(version: object) -> dict[str, object]:
    msg = link.hello(node="a", role="primary", volume="r0", disk_size=SIZE, version="x", settings={})
    msg["version"] = version
    return msg


@pytest.mark.parametrize(("text", "series"), [
    ("0.1.0", (0, 1)), ("0.1", (0, 1)), ("0.1.12", (0, 1)), ("2.10.3", (2, 10)), ("0.1.0+lab", (0, 1)),
    ("0.1.0-rc1", (0, 1)), ("1.0.0.dev3", (1, 0)),
    ("v0.1.0", None), ("0", None), ("", None), ("0.x", None), ("0.1x", None), (None, None), (1.0, None),
    (["0.1.0"], None), ("1234567.1", None),
])
def test_release(text: object, series: tuple[int, int] | None) -> None:
    assert link.release(text) == series


@pytest.mark.parametrize(("primary", "secondary"), [
    ("0.1.0", "0.1.0"), ("0.1.0", "0.1.3"), ("0.1.9", "0.1.0"), ("1.4.0+local", "1.4.2"),
])
def test_the_same_release_pairs(primary: str, secondary: str) -> None:
    link.check_hello(hello(primary), my_disk_size=SIZE, volume="r0", my_version=secondary)


@pytest.mark.parametrize(("primary", "secondary", "shown"), [
    ("0.2.0", "0.1.0", "0.2.0"), ("0.1.0", "0.2.0", "0.1.0"), ("1.1.0", "0.1.0", "1.1.0"),
    ("garbage", "0.1.0", "garbage"), (None, "0.1.0", "unknown"), (7, "0.1.0", "unknown"),
    ("x" * 200, "0.1.0", "unknown"), ("0.1.0\n", "0.1.0", "unknown"),
])
def test_other_releases_are_refused_naming_both(primary: object, secondary: str, shown: str) -> None:
    with pytest.raises(HandshakeRefused) as refused:
        link.check_hello(hello(primary), my_disk_size=SIZE, volume="r0", my_version=secondary)
    message = str(refused.value)
    assert f"the primary runs {shown}, the secondary runs {secondary}" in message
    assert "\n" not in message


def test_the_default_is_this_installation() -> None:
    link.check_hello(hello(__version__), my_disk_size=SIZE, volume="r0")
    major, minor = link.release(__version__) or (0, 0)
    with pytest.raises(HandshakeRefused, match=f"the secondary runs {__version__}"):
        link.check_hello(hello(f"{major}.{minor + 1}.0"), my_disk_size=SIZE, volume="r0")
