# Bash helpers for tests and the demo that drive the test guest. Source it:  . vm-images/lib.sh
#   wait_for_line FILE REGEX TIMEOUT_S [PID] [AFTER]  poll FILE (e.g. the serial log) for a line
#                         matching the extended REGEX, among the lines after the first AFTER ones
#                         (default 0); fail early when PID (if given and not "") has exited
#   line_count FILE       how many lines FILE has now: AFTER for a reply to a command sent next
#   send_cmd SOCKET "gen 2" [TIMEOUT_S]       type one line into the guest's serial unix socket
#   probe_accel [OUTDIR]                      print kvm or tcg (cached in OUTDIR/accel)
#   guest_kernel [OUTDIR]                     the kernel to boot: vmlinux (PVH), else vmlinuz

# Fails (1) after TIMEOUT_S, or as soon as PID (if given) is gone, printing FILE's last 30 lines.
# Looks at complete lines only, so a caller may read the matched line's fields right after.
wait_for_line() {
  local file=$1 regex=$2 timeout=$3 pid=${4:-} after=${5:-0} why="" deadline
  deadline=$((${EPOCHREALTIME//[.,]/} + timeout * 1000000)) # in µs
  # Only complete lines: QEMU logs the console byte by byte, a line may be half written. No -q: no SIGPIPE.
  until head -n "$(wc -l 2>/dev/null < "$file" || echo 0)" "$file" 2>/dev/null | tail -n "+$((after + 1))" \
        | grep -E -- "$regex" >/dev/null; do
    if [ -n "$why" ]; then # one last look after the deadline or the exit, then give up
      echo "wait_for_line: $why waiting for /$regex/ in $file; its last 30 lines:" >&2
      tail -n 30 "$file" >&2 2>/dev/null || true
      return 1
    fi
    if [ "${EPOCHREALTIME//[.,]/}" -ge "$deadline" ]; then why="timed out after ${timeout}s"
    elif [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then why="process $pid exited"
    else sleep 0.2
    fi
  done
}

line_count() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }

# Connects (retrying until TIMEOUT_S, default 10), writes the line and waits until QEMU has taken
# every byte off the socket (SIOCOUTQ = 0) before closing, so nothing is lost with the connection.
# What the guest prints meanwhile is read and dropped (it is in the serial log). QEMU serves one
# client at a time: this fails (times out) while another program holds the serial socket.
send_cmd() {
  /usr/bin/python3 - "$1" "$2" "${3:-10}" <<'PY'
import fcntl, socket, struct, sys, termios, time
path, line, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + timeout
def fail(msg):
    sys.exit(f"send_cmd: {msg} ({path})")
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        break
    except OSError as e:
        s.close()
        if time.monotonic() > deadline:
            fail(f"cannot connect: {e}")
        time.sleep(0.1)
s.setblocking(False)
s.sendall(line.encode() + b"\n")
while True:
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        pass
    queued = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    if queued == 0:
        break
    if time.monotonic() > deadline:
        fail(f"QEMU did not read the command within {timeout:g}s")
    time.sleep(0.05)
s.close()
PY
}

# Prints kvm when a short boot under -accel kvm reaches /init (the initramfs prints
# "CDP-GUEST: PROBE OK"), else tcg. Bounded to 20 s. Cached in OUTDIR/accel for as long as the
# kernel package (OUTDIR/kernel-package, remembered in OUTDIR/accel.kernel) stays the same.
probe_accel() {
  local out=${1:-$(dirname "${BASH_SOURCE[0]}")/out} result=tcg log kernel key
  kernel=$(guest_kernel "$out") || return 1
  key="$(cat "$out/kernel-package" 2>/dev/null) $(qemu-system-x86_64 --version | awk 'NR == 1')"
  if [ -f "$out/accel" ] && [ "$(cat "$out/accel.kernel" 2>/dev/null)" = "$key" ]; then
    cat "$out/accel"
    return
  fi
  if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    log=$(mktemp)
    timeout -k 2 20 qemu-system-x86_64 -nodefaults -no-reboot -display none -m 128 -accel kvm \
      -kernel "$kernel" -initrd "$out/initramfs.gz" -serial "file:$log" \
      -append "console=ttyS0 quiet panic=-1 no_timer_check cdp.probe" </dev/null >/dev/null 2>&1 || true
    grep -q "CDP-GUEST: PROBE OK" "$log" && result=kvm
    rm -f "$log"
  fi
  echo "$result" > "$out/accel.$$" && mv "$out/accel.$$" "$out/accel"
  echo "$key" > "$out/accel.kernel"
  echo "$result"
}

guest_kernel() {
  local out=${1:-$(dirname "${BASH_SOURCE[0]}")/out} k
  for k in vmlinux vmlinuz; do [ -f "$out/$k" ] && { echo "$out/$k"; return; }; done
  echo "guest_kernel: no kernel in $out (run vm-images/build.sh)" >&2
  return 1
}
