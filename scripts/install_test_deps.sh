#!/usr/bin/env bash
# Everything the tests need (README's test command and .ci/run call this). Installs into the
# active virtual environment, or into .venv (made here with python3) when none is active.
# Without root and apt-get it cannot install the browser: it says the command and goes on,
# and the chat page's browser test then skips naming that command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ]; then
  py="$VIRTUAL_ENV/bin/python"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
  echo "note: no virtual environment was active: installing into .venv (activate it: . .venv/bin/activate)" >&2
fi
# the chat page's test drives a headless Chromium through selenium: Debian's browser and driver
browser="sudo apt-get install chromium chromium-driver"
if command -v chromium > /dev/null && command -v chromedriver > /dev/null; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null
else
  echo "note: chromium and chromedriver are missing and need root to install; the browser test will skip." >&2
  echo "      install them with: $browser" >&2
fi
# torch (for the tests that load exported models into transformers and peft): the CPU build,
# pinned, before anything pulls an unpinned (CUDA) one. On Linux it is the +cpu build: from the
# configured indexes when they hold it (a local wheel house), else from PyTorch's CPU index
torch="torch==2.13.0"
if [ "$(uname -s)" = Linux ]; then
  "$py" -m pip install -q "$torch+cpu" 2> /dev/null ||
    "$py" -m pip install -q "$torch+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
else
  "$py" -m pip install -q "$torch"
fi
"$py" -m pip install -q -e '.[test]'
