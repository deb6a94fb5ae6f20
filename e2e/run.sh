#!/usr/bin/env bash
# Browser and Node client tests of web/ (see e2e/README.md). `make e2e` runs this.
# Installs what it needs: Debian's chromium (apt-get, as root) and the npm packages
# in e2e/; builds the release server; then runs the tests against it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

export CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM_PATH" ]; then
  echo "e2e: installing chromium (Debian package)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

echo "e2e: npm packages"
(
  cd e2e
  # playwright-core must never try to download a browser: we use Debian's.
  export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  else
    npm install --no-audit --no-fund --loglevel=error
  fi
)

if [ -z "${ORDERSYNC_BIN:-}" ]; then
  echo "e2e: cargo build --release"
  cargo build --release --bin ordersync
  export ORDERSYNC_BIN="$ROOT/target/release/ordersync"
fi

rm -rf e2e/screenshots
mkdir -p e2e/screenshots
# One file at a time: each starts its own server; chromium and the server share 2 cores.
node --test --test-concurrency=1 e2e/client.test.mjs e2e/browser.test.mjs
