#!/usr/bin/env bash
# Everything the tests need, on a fresh machine (README's test command and .ci/run call this).
set -euo pipefail
cd "$(dirname "$0")/.."
# the chat page's test drives a headless Chromium through selenium: Debian's browser and driver
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null
  else
    echo "error: chromium and chromedriver are missing and cannot be installed here (needs root and apt-get):" \
         "apt-get install chromium chromium-driver" >&2
    exit 1
  fi
fi
# torch (for the tests that load exported models into transformers and peft): the CPU build,
# pinned, before anything pulls an unpinned (CUDA) one
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
