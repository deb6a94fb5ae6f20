#!/usr/bin/env bash
# make fuzz-api: schemathesis (from PyPI) against a live release server, driven by
# docs/openapi.json. Loopback only, temporary database, a user and a token.
# Exits non-zero on any finding.
#
#   FUZZ_EXAMPLES   test cases per operation (default 50)
#   FUZZ_SEED       schemathesis seed (default: random, printed)
#   FUZZ_VENV       virtualenv for schemathesis (default target/schemathesis-venv)
set -euo pipefail
cd "$(dirname "$0")/.."

EXAMPLES="${FUZZ_EXAMPLES:-50}"
SEED="${FUZZ_SEED:-$RANDOM$RANDOM}"
VENV="${FUZZ_VENV:-target/schemathesis-venv}"
SCHEMATHESIS_VERSION="4.32.5"

echo "== schemathesis $SCHEMATHESIS_VERSION in $VENV"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

echo "== build"
cargo build --release --quiet
BIN=target/release/ordersync

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

DB="$WORK/fuzz.db"
printf 'fuzz-password-123\n' | "$BIN" user add fuzz --password-stdin --db "$DB" >/dev/null
TOKEN="$("$BIN" token create fuzz --label schemathesis --db "$DB" | tail -n 1)"

# Generous login limits: schemathesis tries many wrong passwords (429 is still documented).
"$BIN" serve --db "$DB" --listen 127.0.0.1:0 --login-max-failures 100000 \
  >"$WORK/stdout" 2>"$WORK/server.log" &
SERVER_PID=$!
ADDR=""
for _ in $(seq 1 300); do
  ADDR="$(sed -n 's|^ordersync listening on http://||p' "$WORK/stdout" | head -n 1)"
  [ -n "$ADDR" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "server died" >&2; exit 1; }
  sleep 0.1
done
[ -n "$ADDR" ] || { echo "server did not start" >&2; exit 1; }
case "$ADDR" in 127.0.0.1:*) ;; *) echo "not loopback: $ADDR" >&2; exit 1 ;; esac
echo "== server on $ADDR (seed $SEED, $EXAMPLES examples per operation)"

# Logout is excluded: it would revoke the token the rest of the run uses
# (tests/api/auth.rs and tests/security.rs cover it).
set +e
timeout 900 "$VENV/bin/schemathesis" run docs/openapi.json \
  --url "http://$ADDR" \
  --header "Authorization: Bearer $TOKEN" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing \
  --exclude-operation-id logout \
  --max-examples "$EXAMPLES" \
  --seed "$SEED" \
  --workers 1 \
  --request-timeout 30 \
  --generation-database none \
  --suppress-health-check all \
  --report junit --report-dir "$WORK/report" \
  --no-color
STATUS=$?
set -e

# The server must have survived the run.
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "the server died during the run" >&2
  tail -n 50 "$WORK/server.log" >&2
  exit 1
fi
# Errors the server logged about itself (not warp's "server connection error",
# which is a client sending an unparsable request).
if grep 'ERROR' "$WORK/server.log" | grep -v 'server connection error' | grep -q .; then
  echo "== server logged errors:" >&2
  grep 'ERROR' "$WORK/server.log" | grep -v 'server connection error' | head -n 20 >&2
  STATUS=1
fi
if [ "$STATUS" -ne 0 ]; then
  echo "fuzz-api: findings (exit $STATUS); rerun with FUZZ_SEED=$SEED" >&2
  exit "$STATUS"
fi
echo "fuzz-api: no findings"
