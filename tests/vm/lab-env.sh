#!/bin/bash
# Network layout of the lab guest, sourced by every guest command: the NIC
# with the first lab MAC stays in the root namespace ("local"), the other
# moves into the "remote" namespace; the two are joined by vhost-nic's wire.
# Exports the variables upstream HW-mode kselftests read.
LAB_LOCAL_MAC=${LAB_LOCAL_MAC:-52:54:00:12:34:56}
LAB_REMOTE_MAC=${LAB_REMOTE_MAC:-52:54:00:12:34:57}
export LOCAL_V4=192.0.2.1 REMOTE_V4=192.0.2.2
export LOCAL_V6=2001:db8::1 REMOTE_V6=2001:db8::2
export REMOTE_TYPE=netns REMOTE_ARGS=remote
# The lab's tools (a newer ethtool than the host's, mounted by init.sh) go
# first on PATH.
case ":$PATH:" in
    *:/run/lab-tools/bin:*) ;;
    *) [ ! -d /run/lab-tools/bin ] || export PATH=/run/lab-tools/bin:$PATH ;;
esac

lab_if_by_mac() {
    local mac=$1 d
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && { basename "$d"; return 0; }
    done
    return 1
}

lab_net_setup() {
    NETIF=$(lab_if_by_mac "$LAB_LOCAL_MAC") || { echo "lab: no NIC with MAC $LAB_LOCAL_MAC" >&2; return 1; }
    export NETIF
    if ! ip netns list | grep -qw remote; then
        local rif
        rif=$(lab_if_by_mac "$LAB_REMOTE_MAC") || { echo "lab: no NIC with MAC $LAB_REMOTE_MAC" >&2; return 1; }
        ip netns add remote
        ip link set "$rif" netns remote
        ip -n remote link set "$rif" name eth-remote
        ip -n remote link set lo up
        # Tests take the interfaces down and up (queues.py, devmem.py);
        # keep the static IPv6 addresses across that, as IPv4 does.
        ip netns exec remote sysctl -qw net.ipv6.conf.eth-remote.keep_addr_on_down=1
        # The kselftests bind this end of a connection to a port chosen
        # free on the local side only (rand_port); one still in TIME_WAIT
        # here from an earlier connection fails that bind (EADDRINUSE).
        # Keep no TIME_WAIT sockets in this namespace.
        ip netns exec remote sysctl -qw net.ipv4.tcp_max_tw_buckets=0
        ip -n remote addr add "$REMOTE_V4/24" dev eth-remote
        ip -n remote addr add "$REMOTE_V6/64" dev eth-remote nodad
        # The NICs allow MTU 9000; tests start from the usual 1500.
        ip -n remote link set eth-remote mtu 1500 up
    fi
    sysctl -qw "net.ipv6.conf.$NETIF.keep_addr_on_down=1"
    ip addr replace "$LOCAL_V4/24" dev "$NETIF"
    ip addr replace "$LOCAL_V6/64" dev "$NETIF" nodad
    ip link set "$NETIF" mtu 1500 up
}
