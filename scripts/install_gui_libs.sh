#!/usr/bin/env bash
# System libraries the headless napari widget test needs on Debian/Ubuntu: the Xvfb X server
# (pytest-xvfb starts it) and the xcb libraries of Qt's X11 platform plugin. Idempotent; does
# nothing when they are present, and only says what is missing when it cannot install (not
# root, no apt-get): the napari tests then skip with that reason.
set -u
PACKAGES="xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0 libxkbcommon-x11-0 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libgl1 libegl1"
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $PACKAGES 2>/dev/null | grep -v "install ok installed" | cut -d' ' -f1)
for p in $PACKAGES; do dpkg-query -W "$p" >/dev/null 2>&1 || missing="$missing $p"; done
missing=$(echo $missing | tr ' ' '\n' | sort -u | tr '\n' ' ')
[ -z "${missing// /}" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "napari GUI tests need: $missing (install them with apt-get as root)" >&2
    exit 0
fi
apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
