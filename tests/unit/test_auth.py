"""Token parsing and access settings of the orchestrator: the formats accepted and the mistakes named."""

from __future__ import annotations

import pytest

from orchestrator.auth import AccessControl, TokenSource, parse_tokens

TOKEN = "a-token-of-enough-length"
OTHER = "another-token-of-enough-length"


def test_entries_name_a_caller_and_an_optional_role() -> None:
    parsed = parse_tokens(f" alice:{TOKEN} , app:{OTHER}:client,,", source="OPERATOR_TOKENS")
    assert [(c.name, c.role) for c in parsed] == [("alice", "operator"), ("app", "client")]
    assert all(TOKEN not in repr(c) and OTHER not in repr(c) for c in parsed), "only digests are kept"


def test_a_file_has_one_entry_a_line_with_comments_and_one_name_may_hold_two_tokens() -> None:
    text = f"# rotation in progress\n\nalice:{TOKEN}\nalice:{OTHER}\n"
    parsed = parse_tokens(text, source="OPERATOR_TOKENS_FILE", separator="\n")
    assert [c.name for c in parsed] == ["alice", "alice"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"alice{TOKEN}", "entry 1: expected name:token or name:token:role"),
        (f"alice:{TOKEN}:Admin!", "role 'Admin!' must be operator, client, or an approval role"),
        (f"alice:{TOKEN},bob:{TOKEN}", "entry 2: bob and alice share one token"),
        ("alice:short", "the token must be at least 16 characters"),
        (f"alice:{TOKEN} with space", "the token must be"),
        (f"al ice:{TOKEN}", "name 'al ice' must be"),
    ],
)
def test_bad_entries_are_named_without_their_token(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="OPERATOR_TOKENS") as error:
        parse_tokens(text, source="OPERATOR_TOKENS")
    assert message in str(error.value)
    assert TOKEN not in str(error.value)


def test_token_access_needs_tokens_and_settings_must_be_open_or_token() -> None:
    with pytest.raises(ValueError, match="needs tokens"):
        AccessControl(TokenSource(), read_access="token")
    with pytest.raises(ValueError, match="PLACE_ORDER_ACCESS='tokens'"):
        AccessControl(TokenSource(f"alice:{TOKEN}"), place_order_access="tokens")
    assert AccessControl(TokenSource(f"alice:{TOKEN}"), read_access="token").needs_token("read")
    assert not AccessControl(TokenSource()).needs_token("start")


def test_a_token_matches_its_own_entry_only() -> None:
    source = TokenSource(f"alice:{TOKEN},app:{OTHER}:client")
    alice, app = source.match(TOKEN), source.match(OTHER)
    assert alice is not None and (alice.name, alice.allows("operate")) == ("alice", True)
    assert app is not None and (app.name, app.allows("operate"), app.allows("read")) == ("app", False, True)
    assert source.match(TOKEN + "x") is None
