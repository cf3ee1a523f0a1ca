#!/bin/bash
# PID 1 of the lab guest. The root filesystem is the host's, shared
# read-only over 9p (the way virtme-ng boots); everything the guest writes
# goes to tmpfs or to the "results" share. The host puts the command to run
# in results/cmd; its output goes to the console and results/output, its
# exit status to results/status. Then the guest powers off (or reboots when
# the command leaves results/reboot behind).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp LANG=C.UTF-8

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# devtmpfs lacks these links; bash process substitution needs /dev/fd.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# The repository (this script's tree) may live under a directory that gets
# a tmpfs below (a clone in /tmp, say): keep it reachable at its own path.
repo=$(cd "$(dirname "$0")/../.." && pwd)
mount -t tmpfs tmpfs /run
mkdir -p /run/lab-repo
mount --bind "$repo" /run/lab-repo
for d in /tmp /var/tmp /var/log /var/lib/dhcp /root /mnt; do
    mount -t tmpfs tmpfs "$d" 2>/dev/null
done
if [ ! -d "$repo/tests/vm" ]; then
    mkdir -p "$repo"
    mount --bind /run/lab-repo "$repo"
fi
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t hugetlbfs hugetlbfs /dev/hugepages 2>/dev/null || true
mkdir -p /mnt/results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /mnt/results
# Tools the lab provides in place of the host's (guest-tools/: a newer
# ethtool), shared read-only as "labtools": first on PATH, for login shells
# too (Debian's /etc/profile resets PATH; HOME is /tmp).
mkdir -p /run/lab-tools
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro labtools /run/lab-tools 2>/dev/null; then
    export PATH=/run/lab-tools/bin:$PATH
    # shellcheck disable=SC2016 # expanded by the login shell
    echo 'PATH=/run/lab-tools/bin:$PATH' >/tmp/.bash_profile
fi
ip link set lo up
hostname lab

results=/mnt/results
rm -f "$results/status" "$results/reboot"
echo "lab-guest: boot $(cat /proc/sys/kernel/random/boot_id) kernel $(uname -r)"
if [ -f "$results/cmd" ]; then
    # Not a pipe into tee: a background process the command leaves behind
    # would keep the pipe open and the guest from ever finishing.
    bash "$results/cmd" > >(tee -a "$results/output") 2>&1
    echo "$?" > "$results/status"
else
    echo "lab-guest: no results/cmd, starting a shell"
    setsid -c bash -l </dev/ttyS0 >/dev/ttyS0 2>&1
fi
sync
if [ -f "$results/reboot" ]; then
    echo "lab-guest: rebooting"
    reboot -f
fi
echo "lab-guest: powering off"
poweroff -f
