# Shell helpers for scripts that run inside the test VM (sourced; bash).
# The host passes USBD_BIN (the venv's bin directory) and USBD_TESTS (this tests/kernel dir).
set -euo pipefail

: "${USBD_BIN:?USBD_BIN must name the venv bin directory}"
declare -A DAEMON_PID=()

# start NAME COMMAND ARGS...: run a daemon in the background, wait for its
# 'processing requests for' line; fail with its output if it exits first.
start() {
    local name=$1
    shift
    "$@" >"/tmp/$name.out" 2>"/tmp/$name.err" &
    DAEMON_PID[$name]=$!
    local i
    for i in $(seq 600); do
        if grep -q "is processing requests for" "/tmp/$name.out"; then
            grep "processing requests" "/tmp/$name.out"
            return 0
        fi
        if ! kill -0 "${DAEMON_PID[$name]}" 2>/dev/null; then
            echo "daemon $name exited before attaching:"
            cat "/tmp/$name.out" "/tmp/$name.err"
            return 1
        fi
        sleep 0.1
    done
    echo "daemon $name did not attach in time"
    cat "/tmp/$name.out" "/tmp/$name.err"
    return 1
}

ramdisk() {
    local name=$1
    shift
    start "$name" "$USBD_BIN/usbd-ramdisk" "$@"
}

# stop NAME [SIGNAL]: signal the daemon, wait, print its exit status and output.
stop() {
    local name=$1 signal=${2:-TERM} status=0
    kill "-$signal" "${DAEMON_PID[$name]}"
    wait "${DAEMON_PID[$name]}" || status=$?
    echo "daemon $name exit $status"
    sed "s/^/[$name] /" "/tmp/$name.out"
    grep -E "WARNING|ERROR|Traceback" "/tmp/$name.err" | sed "s/^/[$name stderr] /" || true
}

drop_caches() {
    sync
    blockdev --flushbufs "$1"
    echo 3 >/proc/sys/vm/drop_caches
}

# write_files DIR: three files of random data (one written with fsync), checksums kept.
write_files() {
    local dir=$1
    head -c 3M /dev/urandom >"$dir/a.bin"
    head -c 5M /dev/urandom >"$dir/b.bin"
    dd if=/dev/urandom of="$dir/c.bin" bs=64k count=20 conv=fsync status=none
    mkdir -p "$dir/sub"
    echo "hello from usbd" >"$dir/sub/hello.txt"
    (cd "$dir" && sha256sum a.bin b.bin c.bin sub/hello.txt) >"/tmp/sums.$(basename "$dir")"
}

verify_files() {
    local dir=$1
    (cd "$dir" && sha256sum -c --quiet "/tmp/sums.$(basename "$dir")")
    echo "verified $(wc -l <"/tmp/sums.$(basename "$dir")") files in $dir"
}

# fs_roundtrip DEVICE FSTYPE: mkfs, mount, write, sync, unmount, drop caches, mount, verify.
fs_roundtrip() {
    local dev=$1 fs=$2 mnt=/mnt/$2
    mkdir -p "$mnt"
    case $fs in
    ext4) mkfs.ext4 -q -F "$dev" ;;
    xfs) mkfs.xfs -q -f "$dev" ;;
    esac
    mount "$dev" "$mnt"
    write_files "$mnt"
    sync
    umount "$mnt"
    drop_caches "$dev"
    mount "$dev" "$mnt"
    verify_files "$mnt"
    umount "$mnt"
    echo "roundtrip $fs on $dev: ok"
}

# data_bytes URI: bytes the device reports as data (not hole) through block status.
data_bytes() {
    nbdinfo --map --totals "$1" | awk '$3 == 0 { s += $1 } END { print s + 0 }'
}
