"""tls-authz files and the names they match: the file's lines are its patterns, whatever
comments and blank lines lie between them; a certificate's name splits back into its
attributes however odd their values (RFC 4514's escapes); a glob matches as fnmatch does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkfs.nbd.authz import AuthzError, allowed, distinguished_name, parse_allowed

patterns = (
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1)
    .map(str.strip)
    .filter(lambda p: p and not p.startswith("#"))
)
noise = st.sampled_from(["", "   ", "# a comment", "  # indented comment"])
values = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1)
attributes = st.sampled_from(["commonName", "organizationName", "countryName", "1.2.3.4"])
subjects = st.lists(st.lists(st.tuples(attributes, values), min_size=1, max_size=2), max_size=4)


@given(st.lists(st.tuples(st.lists(noise, max_size=2), patterns), min_size=1))
def test_the_lines_of_a_file_are_its_patterns(lines: list[tuple[list[str], str]]) -> None:
    text = "\n".join(line for before, pattern in lines for line in [*before, f" {pattern} "])
    assert parse_allowed("f", text) == tuple(pattern for _, pattern in lines)


@pytest.mark.parametrize("text", ["", "\n\n", "# nobody\n  \n"])
def test_a_file_that_allows_no_one_is_refused(text: str) -> None:
    with pytest.raises(AuthzError, match="tls-authz f: no distinguished name is allowed"):
        parse_allowed("f", text)


def split(name: str, separator: str) -> list[str]:
    """``name`` cut at each ``separator`` that no backslash escapes."""
    parts, part, escaped = [], "", False
    for c in name:
        if escaped or c == "\\":
            part += c
            escaped = not escaped and c == "\\"
        elif c == separator:
            parts.append(part)
            part = ""
        else:
            part += c
    return [*parts, part]


def unescape(value: str) -> str:
    """``value`` with its backslash escapes undone."""
    out, escaped = "", False
    for c in value:
        if c == "\\" and not escaped:
            escaped = True
            continue
        out += c
        escaped = False
    return out


@given(subjects)
def test_a_name_splits_back_into_its_attributes(subject: list[list[tuple[str, str]]]) -> None:
    name = distinguished_name(subject)
    rdns = split(name, ",") if subject else []
    for rdn, attributes in zip(rdns, subject, strict=True):
        pairs = split(rdn, "+")
        assert [(p.partition("=")[0], unescape(p.partition("=")[2])) for p in pairs] == [
            ({"commonName": "CN", "organizationName": "O", "countryName": "C"}.get(k, k), v)
            for k, v in attributes
        ]


def test_names_as_qemu_prints_them_and_globs() -> None:
    subject = [[("countryName", "GB")], [("organizationName", "A, B")], [("commonName", " x ")]]
    name = distinguished_name(subject)
    assert name == "C=GB,O=A\\, B,CN=\\ x\\ "
    assert allowed(["C=GB,O=A\\, B,CN=*"], name)
    assert not allowed(["c=gb,*"], name)  # case matters, as in QEMU's glob rules
