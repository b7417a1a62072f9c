# Shell helpers for the demo and for people driving the test guest by hand. Source it.

# wait_for_line FILE REGEX TIMEOUT_S: polls FILE until a line matches; on timeout prints the
# console's tail to stderr and fails.
wait_for_line() {
  local file=$1 regex=$2 timeout=$3 start=$SECONDS
  until grep -qE "$regex" "$file" 2>/dev/null; do
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
      echo "timed out after ${timeout}s waiting for /$regex/ in $file; its last lines:" >&2
      tail -n 30 "$file" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

# send_cmd SOCKET "gen 2": types one line into the guest's serial console.
send_cmd() {
  /usr/bin/python3 - "$1" "$2" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(100):
    try:
        s.connect(sys.argv[1]); break
    except OSError:
        time.sleep(0.1)
s.sendall(sys.argv[2].encode() + b"\n")
s.settimeout(0.3)
try:
    while s.recv(65536):
        pass
except OSError:
    pass
s.close()
PY
}

# probe_accel OUT: prints kvm when a short KVM boot of the guest reaches its first line, else tcg.
# The answer is cached in OUT/accel.
probe_accel() {
  local out=$1
  if [ -f "$out/accel" ]; then cat "$out/accel"; return; fi
  local result=tcg log
  if [ -w /dev/kvm ]; then
    log=$(mktemp)
    timeout 20 qemu-system-x86_64 -nodefaults -no-reboot -display none -m 128 -accel kvm \
      -kernel "$out/vmlinuz" -initrd "$out/initramfs.gz" -append "console=ttyS0 quiet panic=-1 cdp.probe" \
      -serial "file:$log" >/dev/null 2>&1 || true
    grep -q "CDP-GUEST: PROBE OK" "$log" && result=kvm
    rm -f "$log"
  fi
  echo "$result" > "$out/accel"
  echo "$result"
}
