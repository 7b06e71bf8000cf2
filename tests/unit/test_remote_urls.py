"""server_url and mcp.remote_servers: URLs and patterns taken apart, normalised and
matched part by part, so that no spelling of a URL reaches a host the operator did not
allow."""

from __future__ import annotations

import pytest

from proxy.mcp.remote_urls import RemoteURLError, allows, parse_pattern, parse_url

LOOPBACK = "http://127.0.0.1:8000/mcp"


@pytest.mark.parametrize(
    ("given", "connects_to"),
    [
        (LOOPBACK, LOOPBACK),
        # every spelling of 127.0.0.1
        ("http://2130706433:8000/mcp", LOOPBACK),
        ("http://0x7f000001:8000/mcp", LOOPBACK),
        ("http://0X7F000001:8000/mcp", LOOPBACK),
        ("http://127.1:8000/mcp", LOOPBACK),
        ("http://127.0.1:8000/mcp", LOOPBACK),
        ("http://0177.0.0.1:8000/mcp", LOOPBACK),
        ("http://0x7f.0.0.1:8000/mcp", LOOPBACK),
        ("http://0x7f.1:8000/mcp", LOOPBACK),
        ("http://017700000001:8000/mcp", LOOPBACK),
        ("http://127.0.0.1.:8000/mcp", LOOPBACK),
        ("http://[::ffff:127.0.0.1]:8000/mcp", LOOPBACK),
        ("http://[::ffff:7f00:1]:8000/mcp", LOOPBACK),
        ("http://[0:0:0:0:0:ffff:7f00:1]:8000/mcp", LOOPBACK),
        ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:8000/mcp", LOOPBACK),  # full-width
        ("http://127\u30020\u30020\u30021:8000/mcp", LOOPBACK),  # ideographic full stops
        ("HTTP://127.0.0.1:8000/mcp", LOOPBACK),
        ("http://127.0.0.1:08000/mcp", LOOPBACK),
        # IPv6, compressed and lower-case
        ("http://[0:0:0:0:0:0:0:1]:8000/mcp", "http://[::1]:8000/mcp"),
        ("http://[::1]:8000/mcp", "http://[::1]:8000/mcp"),
        ("http://[FE80:0::AB]/mcp", "http://[fe80::ab]/mcp"),
        ("http://0x/mcp", "http://0.0.0.0/mcp"),
        # names: lower case, IDNA, no root dot
        ("http://LocalHost.:8000/mcp", "http://localhost:8000/mcp"),
        ("https://B\u00fccher.Example/mcp", "https://xn--bcher-kva.example/mcp"),
        ("http://mcp_server.internal:9/x", "http://mcp_server.internal:9/x"),
        ("http://127.0.0.1.nip.io/mcp", "http://127.0.0.1.nip.io/mcp"),  # a name, not an IP
        # default ports are implied; paths lose dot segments and needless escapes
        ("https://example.com:443/mcp", "https://example.com/mcp"),
        ("http://example.com:80", "http://example.com/"),
        ("http://example.com:443/mcp", "http://example.com:443/mcp"),
        ("http://127.0.0.1:8000/a/../mcp", LOOPBACK),
        ("http://127.0.0.1:8000/./mcp/.", "http://127.0.0.1:8000/mcp/"),
        ("http://127.0.0.1:8000/../../mcp", LOOPBACK),
        ("http://127.0.0.1:8000/%6d%63%70", LOOPBACK),
        ("http://127.0.0.1:8000/x/%2e%2E/mcp", LOOPBACK),
        ("http://127.0.0.1:8000/a%3ab", "http://127.0.0.1:8000/a%3Ab"),
        ("http://127.0.0.1:8000/\u00e9", "http://127.0.0.1:8000/%C3%A9"),
        # the query is kept, the fragment is never sent
        ("http://127.0.0.1:8000/mcp?key=v&x#frag", "http://127.0.0.1:8000/mcp?key=v&x"),
        ("http://127.0.0.1:8000/mcp#a?b", LOOPBACK),
    ],
)
def test_a_url_is_connected_in_its_one_normal_spelling(given, connects_to):
    """Every spelling of a host, port and path comes out as one URL, the one connected."""
    assert parse_url(given).url == connects_to


@pytest.mark.parametrize(
    ("given", "because"),
    [
        ("http://127.0.0.1:1@localhost:18602/mcp", "user name or password"),
        ("http://user:pass@127.0.0.1:8000/mcp", "user name or password"),
        ("http://@127.0.0.1:8000/mcp", "user name or password"),
        ("http://127.0.0.1:8000@evil.example/mcp", "user name or password"),
        ("http://127.0.0.1%40evil.example/mcp", "not a valid domain name"),
        ("http://127.0.0.1:8000\\@evil.example/mcp", "backslash"),
        ("http://evil.example\\.127.0.0.1/mcp", "backslash"),
        ("http://127.0.0.1 /mcp", "space"),
        ("http://127.0.0.1:8000/mcp\n", "control character"),
        ("http://127.0.0.1:8000/m\tcp", "control character"),
        ("http://loc\u00adalhost/mcp", "control character"),  # soft hyphen: not printable
        ("ftp://127.0.0.1/mcp", "not an http"),
        ("file:///etc/passwd", "not an http"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "not an http"),
        ("127.0.0.1:8000/mcp", "not an http"),
        ("http:/127.0.0.1/mcp", "not an http"),
        ("//127.0.0.1/mcp", "not an http"),
        ("http://127.0.0.1:0/mcp", "port"),
        ("http://127.0.0.1:65536/mcp", "port"),
        ("http://127.0.0.1:99999/mcp", "port"),
        ("http://127.0.0.1:-1/mcp", "port"),
        ("http://127.0.0.1:+80/mcp", "port"),
        ("http://127.0.0.1:8_0/mcp", "port"),
        ("http://127.0.0.1:\u0668\u0660/mcp", "port"),  # Arabic-Indic digits
        ("http://127.0.0.1:" + "1" * 5000 + "/mcp", "port"),
        ("http://127.0.0.1:80:80/mcp", "port"),
        ("http://[::1]:80:80/mcp", "port"),
        ("http:///mcp", "no host"),
        ("http://:8000/mcp", "no host"),
        ("http://256.0.0.1/mcp", "IPv4"),
        ("http://1.2.3.4.5/mcp", "IPv4"),
        ("http://08.0.0.1/mcp", "IPv4"),
        ("http://4294967296/mcp", "IPv4"),
        ("http://127.0.0.256/mcp", "IPv4"),
        ("http://1..1/mcp", "IPv4"),
        ("http://a..b/mcp", "domain name"),
        ("http://./mcp", "domain name"),
        ("http://" + "a" * 64 + ".example/mcp", "domain name"),
        ("http://ex ample.com/mcp", "space"),
        ("http://[::1/mcp", "unclosed \\["),
        ("http://[::1]x:80/mcp", "between the ]"),
        ("http://[fe80::1%25eth0]/mcp", "IPv6 zone"),
        ("http://[::g]/mcp", "IPv6"),
        ("http://[127.0.0.1]/mcp", "IPv6"),
        ("http://127.0.0.1:8000/a%2fb", "escaped /"),
        ("http://127.0.0.1:8000/a%5Cb", "escaped /"),
        ("http://127.0.0.1:8000/a%zzb", "not a %XX escape"),
        ("http://127.0.0.1:8000/a%", "not a %XX escape"),
    ],
)
def test_urls_lmbridge_will_not_read_are_refused(given, because):
    """Userinfo, schemes other than http(s), bad ports, hosts and escapes: refused with
    a reason, never guessed at."""
    with pytest.raises(RemoteURLError, match=because):
        parse_url(given)


@pytest.mark.parametrize(
    ("pattern", "url", "matches"),
    [
        # the issue: 127.0.0.1:1 is a password, the host is localhost (refused above),
        # and the spellings of 127.0.0.1 are 127.0.0.1
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:18602/mcp", True),
        ("http://127.0.0.1:*/mcp", "http://2130706433:18602/mcp", True),
        ("http://127.0.0.1:*/mcp", "http://[::ffff:7f00:1]:18602/mcp", True),
        ("http://127.0.0.1:*/mcp", "http://localhost:18602/mcp", False),
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1.nip.io:18602/mcp", False),
        ("http://127.0.0.1:*/mcp", "http://127.0.0.2:18602/mcp", False),
        ("http://127.0.0.1:*/mcp", "http://[::1]:18602/mcp", False),
        ("http://127.0.0.1:*/mcp", "https://127.0.0.1:18602/mcp", False),
        # a pattern's own host is normalised too
        ("http://2130706433:*/mcp", "http://127.0.0.1:1/mcp", True),
        ("http://LOCALHOST.:*/mcp", "http://localhost:1/mcp", True),
        ("http://[0::1]:*/mcp", "http://[::1]:1/mcp", True),
        ("https://b\u00fccher.example/mcp", "https://xn--bcher-kva.example/mcp", True),
        # the port: a number, * or the scheme's default
        ("http://127.0.0.1:8000/mcp", "http://127.0.0.1:8000/mcp", True),
        ("http://127.0.0.1:8000/mcp", "http://127.0.0.1:8001/mcp", False),
        ("http://127.0.0.1/mcp", "http://127.0.0.1:80/mcp", True),
        ("http://127.0.0.1/mcp", "http://127.0.0.1:8000/mcp", False),
        ("https://example.com/mcp", "https://example.com:443/mcp", True),
        # * never crosses into another part
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:1/x/mcp", False),
        ("http://127.0.0.1:*", "http://127.0.0.1:1/mcp", False),
        ("http://127.0.0.1:*", "http://127.0.0.1:1/", True),
        # the path: segment by segment, shell-style inside one, ** for any rest
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:1/mcp/", True),
        ("http://127.0.0.1:*/mcp/", "http://127.0.0.1:1/mcp", True),
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:1/MCP", False),
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:1/mcp/x", False),
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:1/x/../mcp", True),
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:1/mcp/../admin", False),
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:1/mcp/%2e%2e/admin", False),
        ("http://127.0.0.1:*/mcp*", "http://127.0.0.1:1/mcp-v2", True),
        ("http://127.0.0.1:*/mcp*", "http://127.0.0.1:1/mcp/admin", False),
        ("http://127.0.0.1:*/*/mcp", "http://127.0.0.1:1/tools/mcp", True),
        ("http://127.0.0.1:*/*/mcp", "http://127.0.0.1:1/a/b/mcp", False),
        ("http://127.0.0.1:*/v[0-9]/mcp", "http://127.0.0.1:1/v2/mcp", True),
        ("http://127.0.0.1:*/srv/**", "http://127.0.0.1:1/srv", True),
        ("http://127.0.0.1:*/srv/**", "http://127.0.0.1:1/srv/a/b/mcp", True),
        ("http://127.0.0.1:*/srv/**", "http://127.0.0.1:1/srv2/mcp", False),
        ("http://127.0.0.1:*/srv/**", "http://127.0.0.1:1/srv/../etc", False),
        ("http://127.0.0.1:*/mcp", "http://127.0.0.1:1/mcp?token=x", True),  # query not matched
        # host wildcards: one whole label per *
        ("https://*/mcp", "https://anything.example/mcp", True),
        ("https://*/mcp", "https://10.1.2.3/mcp", True),
        ("https://*.example.com/mcp", "https://a.example.com/mcp", True),
        ("https://*.example.com/mcp", "https://A.Example.COM./mcp", True),
        ("https://*.example.com/mcp", "https://a.b.example.com/mcp", False),
        ("https://*.example.com/mcp", "https://example.com/mcp", False),
        ("https://*.example.com/mcp", "https://a.example.com.evil.net/mcp", False),
        ("https://*.example.com/mcp", "https://aexample.com/mcp", False),
        ("http://10.0.0.*:*/mcp", "http://10.0.0.7:1/mcp", True),
        ("http://10.0.0.*:*/mcp", "http://167772167:1/mcp", True),  # 10.0.0.7
        ("http://10.0.0.*:*/mcp", "http://10.0.0.7.evil.com:1/mcp", False),
        ("http://10.0.0.*:*/mcp", "http://10.0.1.7:1/mcp", False),
        ("http://10.*.*.*:*/mcp", "http://10.200.0.1:1/mcp", True),
    ],
)
def test_patterns_match_part_by_part(pattern, url, matches):
    """Scheme, host, port and path are each matched by their own rule."""
    assert parse_pattern(pattern).matches(parse_url(url)) is matches


@pytest.mark.parametrize(
    ("pattern", "because"),
    [
        ("http://user:pw@127.0.0.1:*/mcp", "user name or password"),
        ("ftp://127.0.0.1/mcp", "not an http"),
        ("http*://127.0.0.1:*/mcp", "not an http"),
        ("*://127.0.0.1:*/mcp", "not an http"),
        ("http://127.0.0.1:*/mcp?x=1", r"a \? or #"),
        ("http://127.0.0.1:*/mc?", r"a \? or #"),
        ("http://127.0.0.1:*/mcp#x", r"a \? or #"),
        ("http://127.0.0.1:99999/mcp", "port"),
        ("http://127.0.0.1:8*/mcp", "port"),
        ("http://127.0.0.1:*/a/**/b", r"\*\* before the last"),
        ("http://api-*.example.com/mcp", "whole label"),
        ("http://127.0.0.1*/mcp", "whole label"),
        ("http://[::*]/mcp", "IPv6"),
        ("http://10.0.*/mcp", "four decimal numbers"),
        ("http://10.0.0.300/mcp", "IPv4"),
        ("http://10.0.0.*.*/mcp", "four decimal numbers"),
        ("http://0x7f.*.*.*/mcp", "hex or octal"),
        ("http://010.*.*.*/mcp", "hex or octal"),
        ("http://*.ex ample.com/mcp", "space"),
        ("http://*..com/mcp", "domain name"),
        ("http:///mcp", "no host"),
        ("http://127.0.0.1:*/a%2fb", "escaped /"),
        ("not a url", "space"),
        ("", "not an http"),
    ],
)
def test_patterns_lmbridge_cannot_match_are_refused(pattern, because):
    """A pattern that could not mean what it seems to is an error at start-up."""
    with pytest.raises(RemoteURLError, match=because):
        parse_pattern(pattern)


def test_allows_tries_each_pattern():
    """A URL is allowed when any pattern matches it; none allows nothing."""
    url = parse_url("http://127.0.0.1:8000/mcp")
    assert allows(["https://*.example.com/mcp", "http://127.0.0.1:*/mcp"], url)
    assert not allows(["https://*.example.com/mcp"], url)
    assert not allows([], url)
