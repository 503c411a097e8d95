"""Reading a `wrangler d1 export` SQL file as a SAIGE database; copied verbatim from the marker down (`make sync`)."""

from __future__ import annotations

import os
import re
import sqlite3

# --- shared: d1 dump (the same in every script: edit shared_blocks/d1_dump.py, then `make sync`) -------------
# What a `wrangler d1 export` of a SAIGE database holds: the contract's tables (and D1's own bookkeeping), their
# indexes and their rows. Any other statement is refused: the file is data, never a script to run.
D1_TABLES = {
    "scenarios",
    "experiences",
    "causal_patterns",
    "model_versions",
    "sqlite_sequence",
    "d1_migrations",
    "scenario_splits",
}
D1_TABLE = r"""(?:"(?P<q>[^"]+)"|`(?P<b>[^`]+)`|\[(?P<s>[^\]]+)\]|(?P<n>\w+))"""
D1_STATEMENTS = [
    re.compile(pattern, re.I | re.S)
    for pattern in (
        r"PRAGMA\s+(?:defer_foreign_keys|foreign_keys)\s*=\s*\w+\s*;",
        r"(?:BEGIN(?:\s+TRANSACTION)?|COMMIT|END(?:\s+TRANSACTION)?)\s*;",
        rf"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{D1_TABLE}\s*\(.*\)\s*;",
        rf"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?[\w\"`\[\]]+\s+ON\s+{D1_TABLE}\s*\(.*\)\s*;",
        rf"INSERT\s+(?:OR\s+\w+\s+)?INTO\s+{D1_TABLE}\s*(?:\([^;]*?\))?\s*VALUES\s*\(.*\)\s*;",
        rf"DELETE\s+FROM\s+{D1_TABLE}\s*;",
        r"ANALYZE\s+sqlite_schema\s*;",
    )
]


def is_sql_dump(path) -> bool:
    """Whether --db names a SQL text file (a `wrangler d1 export`) rather than a SQLite database."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return str(path).lower().endswith(".sql")
    if head.startswith(b"SQLite format 3\x00"):
        return False
    text = head.lstrip().upper()
    return str(path).lower().endswith(".sql") or text.startswith((b"PRAGMA", b"CREATE", b"INSERT", b"BEGIN", b"--"))


def d1_statement_ok(statement: str) -> bool:
    for pattern in D1_STATEMENTS:
        match = pattern.fullmatch(statement)
        if match:
            table = next((match.group(g) for g in "qbsn" if match.groupdict().get(g)), None)
            return table is None or table.lower() in D1_TABLES
    return False


def load_d1_dump(path, target) -> None:
    """Run a `wrangler d1 export` file into the new SQLite database `target`, one checked statement at a time.
    Raises ValueError with one line for anything that is not SAIGE's tables and rows."""
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")  # a scratch copy: nothing to recover if the run stops
        conn.execute("BEGIN")
        pending, first_line = "", 1
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not pending and (not line.strip() or line.lstrip().startswith("--")):
                    first_line = number + 1
                    continue
                pending += line
                if not sqlite3.complete_statement(pending):
                    continue
                statement, pending = pending.strip(), ""
                if not d1_statement_ok(statement):
                    raise ValueError(f"line {first_line}: not a SAIGE table, index or row: {statement[:60]!r}")
                if not re.match(r"(BEGIN|COMMIT|END)\b", statement, re.I):  # one transaction of our own
                    conn.execute(statement)
                first_line = number + 1
        if pending.strip():
            raise ValueError(f"line {first_line}: the file ends inside a statement (a truncated export?)")
        conn.execute("COMMIT")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except sqlite3.Error as e:
        raise ValueError(f"line {first_line}: {e}") from None
    finally:
        conn.close()


def sql_dump_copy(path) -> str:
    """A temporary SQLite copy of a SQL dump (the caller removes it); raises ValueError with one line."""
    import tempfile

    fd, target = tempfile.mkstemp(prefix="saige-d1-", suffix=".db")
    os.close(fd)
    try:
        load_d1_dump(path, target)
    except BaseException:
        os.unlink(target)
        raise
    return target


# --- end shared: d1 dump -----------------------------------------------------------------------------------
