#!/bin/sh
# Make sure a headless Chromium is available for the report page test (Debian's `chromium`).
# Does nothing when one is already on PATH; otherwise installs it with apt-get (needs root or
# sudo). Never fails the caller: without Chromium the browser test skips with a reason.
set -u
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: no apt-get; install Chromium yourself to run the report page test" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "ensure-chromium: not root and no sudo; the report page test will skip" >&2
        exit 0
    fi
fi
echo "ensure-chromium: installing Debian's chromium package" >&2
if ! { $SUDO apt-get update -q && \
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        chromium; } >&2; then
    echo "ensure-chromium: install failed; the report page test will skip" >&2
fi
exit 0
