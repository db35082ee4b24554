"""cfk_otel/_db.py: bounded labels for query and command timings."""

from __future__ import annotations

import pytest

from cfk_otel._db import redis_command, sql_operation


@pytest.mark.parametrize(
    ("sql", "operation"),
    [
        ("SELECT 1", "SELECT"),
        ("  select * from t", "SELECT"),
        ("INSERT INTO t VALUES ($1)", "INSERT"),
        ("/* tag */ UPDATE t SET x = 1", "UPDATE"),
        ("-- comment\nDELETE FROM t", "DELETE"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "WITH"),
        ("(SELECT 1)", "OTHER"),
        ("DROP TABLE users; -- secret", "DROP"),
        ("password='hunter2'", "OTHER"),
        ("", "OTHER"),
        ("/* never closed", "OTHER"),
        (None, "OTHER"),
    ],
)
def test_sql_operation(sql: object, operation: str) -> None:
    assert sql_operation(sql) == operation


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (("get", "k"), "GET"),
        ((b"SET", "k", "v"), "SET"),
        (("CLIENT LIST",), "CLIENT LIST"),
        (("x" * 40,), "OTHER"),
        (("GET;rm -rf",), "OTHER"),
        ((), "OTHER"),
        ((42,), "OTHER"),
    ],
)
def test_redis_command(args: tuple[object, ...], command: str) -> None:
    assert redis_command(args) == command
