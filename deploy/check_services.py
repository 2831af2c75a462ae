"""Says exactly which service the platform cannot reach and how to start it,
instead of a traceback. Exit 0 when PostgreSQL and Redis answer; also creates the
platform's database when the server is up but the database is missing."""
import os
import shutil
import socket
import sys

POSTGRES_HOST = os.environ.get("POSTGRES_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("POSTGRES_PORT", "5432"))
POSTGRES_DB = os.environ.get("POSTGRES_DB", "llmplatform")
POSTGRES_USER = os.environ.get("POSTGRES_USER", "postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _postgres_problem() -> str | None:
    if not _port_open(POSTGRES_HOST, POSTGRES_PORT):
        start = (
            "sudo pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
            if shutil.which("pg_ctlcluster")
            else "install it (Debian/Ubuntu: sudo apt-get install postgresql; macOS: brew install postgresql@16 "
            "&& brew services start postgresql@16)"
        )
        return (f"PostgreSQL is not reachable at {POSTGRES_HOST}:{POSTGRES_PORT}.\n"
                f"  Start it: {start}\n  Or point the platform elsewhere with POSTGRES_HOST / POSTGRES_PORT.")
    import psycopg

    try:
        with psycopg.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user=POSTGRES_USER,
                             password=os.environ.get("POSTGRES_PASSWORD", ""), dbname="postgres",
                             connect_timeout=5, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (POSTGRES_DB,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{POSTGRES_DB}"')
                print(f"created database {POSTGRES_DB}")
    except psycopg.OperationalError as error:
        return (f"PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT} refused user {POSTGRES_USER!r}: "
                f"{str(error).strip()}\n  Set POSTGRES_USER / POSTGRES_PASSWORD, or allow local trust auth.")
    return None


def _redis_problem() -> str | None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        start = ("redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
                 if shutil.which("redis-server")
                 else "install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis "
                 "&& brew services start redis)")
        return f"Redis is not reachable at {REDIS_URL} ({error}).\n  Start it: {start}\n  Or set REDIS_URL."
    return None


def main() -> int:
    problems = [p for p in (_postgres_problem(), _redis_problem()) if p]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
