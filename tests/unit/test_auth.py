"""Bearer tokens: loading, checking, refusing (clipserve.server.auth), without a server."""

from __future__ import annotations

import pytest

from clipserve.server.auth import INVALID, MISSING, BearerTokens, load_tokens
from clipserve.server.settings import ConfigError

TOKEN = "s3cr3t-token-AAAA"


def test_tokens_from_a_file_and_the_environment(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# deploy tokens\n{TOKEN}\n\n  second-token \n")
    tokens = load_tokens(str(path), "MY_TOKENS", {"MY_TOKENS": "third, fourth"})
    assert tokens == [TOKEN, "second-token", "third", "fourth"]
    assert load_tokens("", "", {}) == []


@pytest.mark.parametrize(
    ("file_text", "env", "message"),
    [
        (None, {}, "auth_token_env names MY_TOKENS, which is not set"),
        ("# nothing\n", {"MY_TOKENS": " , "}, "no token was found"),
        ("bad token\n", {"MY_TOKENS": "ok"}, "printable ASCII without spaces"),
    ],
)
def test_unusable_token_sources_are_refused(tmp_path, file_text, env, message) -> None:
    path = tmp_path / "tokens"
    if file_text is not None:
        path.write_text(file_text)
    with pytest.raises(ConfigError, match=message) as info:
        load_tokens(str(path) if file_text is not None else "", "MY_TOKENS", env)
    assert TOKEN not in str(info.value)


def test_an_unreadable_file_is_named_without_its_content(tmp_path) -> None:
    with pytest.raises(ConfigError, match="auth_token_file: cannot read it"):
        load_tokens(str(tmp_path / "missing"), "", {})


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((("authorization", f"Bearer {TOKEN}"),), None),
        ((("authorization", f"bearer {TOKEN}"),), None),  # the scheme is case-insensitive
        ((("authorization", "Bearer other-token"),), None),
        ((), MISSING),
        (None, MISSING),
        ((("x-api-key", TOKEN),), MISSING),
        ((("authorization", f"Basic {TOKEN}"),), MISSING),
        ((("authorization", "Bearer "),), INVALID),
        ((("authorization", f"Bearer {TOKEN}x"),), INVALID),
        ((("authorization", f"Bearer {TOKEN[:-1]}"),), INVALID),
        ((("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer x")), INVALID),
    ],
)
def test_authorized(metadata, reason) -> None:
    tokens = BearerTokens([TOKEN, "other-token"])
    assert tokens.authorized(metadata) == reason


def test_no_token_is_kept_in_the_clear() -> None:
    tokens = BearerTokens([TOKEN])
    assert TOKEN not in repr(vars(tokens))
    assert TOKEN.encode() not in b"".join(tokens._digests)
