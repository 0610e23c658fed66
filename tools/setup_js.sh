#!/usr/bin/env bash
# Install what the JavaScript client tests need (tests/test_node.py, tests/test_web.py) on a
# fresh Debian machine: Node.js + npm and Chromium from apt when missing, then the locked npm
# packages of examples/node and examples/web (`npm ci`). Idempotent: when everything is in
# place it only compares two checksums and returns in well under a second.
# Without this the JS tests skip; `pytest` still passes.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need=()
{ command -v node >/dev/null && command -v npm >/dev/null; } || need+=(nodejs npm)
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    echo "setup_js: apt-get install ${need[*]}" >&2
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup_js: warning: no apt-get; install ${need[*]} yourself (the JS tests skip without them)" >&2
  fi
fi
command -v npm >/dev/null || { echo "setup_js: npm not available; skipping npm packages" >&2; exit 0; }

# onnxruntime-node's install script would fetch CUDA binaries from a host outside the npm
# registry; the CPU binaries ship inside the package, so skip that download.
export ONNXRUNTIME_NODE_INSTALL_CUDA=skip ONNXRUNTIME_NODE_INSTALL=skip
for dir in examples/node examples/web; do
  lock="$dir/package-lock.json"
  stamp="$dir/node_modules/.ufad-lock.sha256"
  want="$(sha256sum "$lock" | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    continue  # installed tree already matches the lock file
  fi
  echo "setup_js: npm ci in $dir" >&2
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$want" > "$stamp"
done
