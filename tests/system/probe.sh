# What a process inside a Quilt container sees and may do, checked from inside.
# Run by busybox sh in a container (see test_security.py), in the spirit of
# the OCI runtime-tools validation: one line per check, "ok NAME" or
# "not ok NAME: detail", then "done N" with the count of failures, which is
# also the exit status. The expected capability mask comes in $WANT_CAPS, and
# $USERNS is 1 when the container runs in a user namespace of its own.

failures=0
ok() { echo "ok $1"; }
bad() { echo "not ok $1: $2"; failures=$((failures + 1)); }
check() { name=$1; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else bad "$name" "$*"; fi; }
refused() { name=$1; shift; if "$@" >/dev/null 2>&1; then bad "$name" "succeeded: $*"; else ok "$name"; fi; }
status() { sed -n "s/^$1:[[:space:]]*//p" /proc/self/status; }
# "ro" among the options of the mount at exactly this path
mounted_ro() { awk -v p="$1" '$5 == p { split($6, o, ","); for (i in o) if (o[i] == "ro") f = 1 } END { exit !f }' \
    /proc/self/mountinfo; }
eperm() { name=$1; shift; out=$("$@" 2>&1); rc=$?
    case "$rc:$out" in 0:*) bad "$name" "succeeded: $*";; *"ermission denied"*|*"not permitted"*) ok "$name";;
        *) bad "$name" "rc $rc, not EPERM: $out";; esac; }

# Capabilities and privileges: sets, no_new_privs, seccomp in filter mode.
for set in CapEff CapPrm CapBnd; do
    [ "$(status $set)" = "$WANT_CAPS" ] && ok "$set" || bad "$set" "$(status $set) != $WANT_CAPS"
done
for set in CapInh CapAmb; do
    [ "$(status $set)" = "0000000000000000" ] && ok "$set" || bad "$set" "$(status $set)"
done
[ "$(status NoNewPrivs)" = 1 ] && ok NoNewPrivs || bad NoNewPrivs "$(status NoNewPrivs)"
[ "$(status Seccomp)" = 2 ] && ok Seccomp || bad Seccomp "$(status Seccomp)"

# A session of its own without a terminal (TIOCSTI), and only fds 0-2.
set -- $(sed 's/.*) //' /proc/$$/stat)
[ "$4" = "$$" ] && ok session-leader || bad session-leader "session $4, pid $$"
[ "$5" = 0 ] && ok no-tty || bad no-tty "tty_nr $5"
# (A child shell inherits whatever was left open; the fd of its own directory
# listing is closed again before the test, so it no longer exists.)
fds=$(sh -c 'for f in /proc/$$/fd/*; do [ -e "$f" ] && echo "${f##*/}"; done' | tr '\n' ' ')
[ "$fds" = "0 1 2 " ] && ok fds-closed || bad fds-closed "open: $fds"

# Masked and read-only parts of /proc.
for f in kcore keys timer_list sched_debug latency_stats timer_stats; do
    [ -e /proc/$f ] || continue
    [ "$(wc -c < /proc/$f)" = 0 ] && [ -c /proc/$f ] && ok "masked /proc/$f" || bad "masked /proc/$f" "readable"
done
for d in acpi scsi; do
    [ -e /proc/$d ] || continue
    [ -z "$(ls -A /proc/$d)" ] && mounted_ro /proc/$d && ok "masked /proc/$d" || bad "masked /proc/$d" "not empty/ro"
done
for p in sys sysrq-trigger irq bus fs; do
    [ -e /proc/$p ] || continue
    mounted_ro /proc/$p && ok "read-only /proc/$p" || bad "read-only /proc/$p" "not ro in mountinfo"
done
refused "write /proc/sysrq-trigger" sh -c 'echo h > /proc/sysrq-trigger'
refused "write /proc/sys" sh -c 'echo 1 > /proc/sys/kernel/sysrq'

# /sys read-only, firmware hidden.
mounted_ro /sys && ok "read-only /sys" || bad "read-only /sys" "not ro"
refused "write /sys" sh -c 'echo x > /sys/kernel/uevent_helper'
[ -z "$(ls -A /sys/firmware)" ] && ok "masked /sys/firmware" || bad "masked /sys/firmware" "$(ls /sys/firmware)"

# /dev: only the expected entries; other devices unusable even when made (device policy).
devs=$(ls -A /dev | tr '\n' ' ')
want="fd full null ptmx pts random shm stderr stdin stdout tty urandom zero "
[ "$devs" = "$want" ] && ok "/dev listing" || bad "/dev listing" "$devs"
check "read /dev/urandom" sh -c 'head -c 16 /dev/urandom | wc -c | grep -qx 16'
check "write /dev/null" sh -c 'echo x > /dev/null'
# CAP_MKNOD is kept (Docker's set); the scope's device policy refuses the rest.
eperm "mknod a disk" mknod /tmp/probe-sda b 8 0
eperm "mknod /dev/mem" mknod /tmp/probe-mem c 1 1
if [ "$USERNS" = 1 ]; then
    # In a user namespace no device node can be made at all: the kernel
    # wants CAP_MKNOD in the host's namespace.
    eperm "mknod in a user namespace" mknod /tmp/probe-null c 1 3
    set -- $(cat /proc/self/uid_map)
    [ "$1 $3" = "0 65536" ] && [ "$2" -ge 524288 ] && ok "uid_map" || bad "uid_map" "$*"
else
    check "mknod an allowed node" mknod /tmp/probe-null c 1 3
    check "use the allowed node" sh -c 'echo x > /tmp/probe-null'
    set -- $(cat /proc/self/uid_map)
    [ "$1 $2 $3" = "0 0 4294967295" ] && ok "uid_map" || bad "uid_map" "$*"
fi
rm -f /tmp/probe-null

# The mount table: nothing but the container's own mounts.
mounts=$(awk '{print $5}' /proc/self/mountinfo | sort | tr '\n' ' ')
echo "# mounts: $mounts"
case "$mounts" in *" /sys/fs/cgroup"*|*/var/lib/*|*/run/*|*/home*) bad "mount table" "host mounts: $mounts";;
    *) ok "mount table";; esac

# Host processes are invisible, and init's executable and memory are closed.
procs=$(ls /proc | grep -c '^[0-9][0-9]*$')
[ "$procs" -le 6 ] && ok "own pid namespace" || bad "own pid namespace" "$procs processes visible"
grep -qs -e systemd -e dbus /proc/[0-9]*/comm && bad "no host processes" "$(cat /proc/[0-9]*/comm)" \
    || ok "no host processes"
refused "readlink /proc/1/exe" readlink /proc/1/exe
refused "read /proc/1/exe" head -c 1 /proc/1/exe
refused "read /proc/1/mem" head -c 1 /proc/1/mem
refused "read /proc/1/environ" head -c 1 /proc/1/environ
# Init holds the exec channel's socket: none of its descriptors may be reached.
leaked=$(for f in /proc/1/fd/*; do readlink "$f" 2>/dev/null; done)
[ -z "$leaked" ] && ok "init's descriptors" || bad "init's descriptors" "$leaked"

# What must fail: mounts, modules, reboot, swap, a new user namespace, other namespaces.
mkdir -p /tmp/probe-mnt
eperm "mount tmpfs" mount -t tmpfs none /tmp/probe-mnt
eperm "umount /proc" umount /proc
eperm "umount /dev/null" umount -l /dev/null
printf 'not an ELF module' > /tmp/probe.ko
eperm "insmod" insmod /tmp/probe.ko
eperm "rmmod" rmmod loop
eperm "reboot" reboot -f
eperm "swapon" swapon /tmp/probe.ko
eperm "unshare user" unshare -U true
eperm "unshare mount" unshare -m true
eperm "nsenter host mnt" nsenter -t 1 -m true
eperm "pivot_root" pivot_root /tmp /tmp/probe-mnt
refused "sysctl write" sysctl -w kernel.hostname=x
eperm "hostname" hostname probe-renamed
eperm "chroot then mount" chroot / mount -t proc proc /tmp/probe-mnt
rm -rf /tmp/probe.ko /tmp/probe-mnt

echo "done $failures"
exit "$failures"
