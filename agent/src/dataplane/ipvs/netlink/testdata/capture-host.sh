#!/bin/sh
# Host side of the capture (see capture.sh): stages strace into a VM share, boots the kernel
# given as $1 (6.1 or 6.12), runs capture.sh there, and leaves the traces in $SHARE/traces.
set -e
KERNEL=${1:-6.1}
HERE=$(cd "$(dirname "$0")" && pwd)
SHARE=${CARGO_TARGET_DIR:-/work/main/target}/vm/share-ipvs-capture-$KERNEL
rm -rf "$SHARE"
mkdir -p "$SHARE/bin" "$SHARE/lib"
cp /usr/bin/strace "$SHARE/bin/"
ldd /usr/bin/strace | awk '/=> \// {print $3}' | xargs -I{} cp -L {} "$SHARE/lib/"
{ echo '#!/bin/sh'; echo 'export LD_LIBRARY_PATH=/host/lib'; cat "$HERE/capture.sh"; } > "$SHARE/run.sh"
cd "$HERE" && cd "$(git rev-parse --show-toplevel)" && cargo xtask vm-run --kernel "$KERNEL" --timeout 300 "$SHARE"
echo "traces in $SHARE/traces"
python3 "$HERE/extract.py" "$SHARE/traces" "$HERE/$KERNEL"
