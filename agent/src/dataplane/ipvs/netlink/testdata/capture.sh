#!/bin/sh
# Captures the generic-netlink messages the real ipvsadm sends (and the kernel's replies) for
# every IPVS request kind topoproxy sends. Runs INSIDE the VM (busybox sh, root) with strace and
# its libraries staged into the share; traces land in /host/traces/<name>.strace.
#
# Redo from the host (worktree root):
#   sh agent/src/dataplane/ipvs/netlink/testdata/capture-host.sh 6.1
# which stages strace, runs this script in the VM and turns the traces into the vectors
# (<kernel>/<name>.txt) with extract.py.
set -e
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
T=/host/traces
mkdir -p $T
# IPVS refuses real servers with no route to them.
/usr/sbin/ip link add tp-route type dummy
/usr/sbin/ip link set tp-route up
/usr/sbin/ip addr add 10.244.255.254/16 dev tp-route
/usr/sbin/ip -6 addr add fd00:244::ffff/64 dev tp-route nodad
/usr/sbin/ipvsadm -C

cap() {
    name=$1
    shift
    /host/bin/strace -f -e trace=sendmsg,recvmsg -e write=3,4,5 -e read=3,4,5 -xx -s 65536 -o "$T/$name.strace" /usr/sbin/ipvsadm "$@"
    echo "== $name: ipvsadm $*" >> $T/commands.txt
}

cap new-service-tcp4-rr -A -t 10.96.0.10:80 -s rr
cap new-service-udp4-wrr-persist -A -u 10.96.0.10:53 -s wrr -p 300
cap new-service-sctp4-rr -A --sctp-service 10.96.0.11:9000 -s rr
cap new-service-tcp6-rr -A -t [fd00::10]:80 -s rr
cap new-service-udp6-sh-persist -A -u [fd00::10]:53 -s sh -p 60
cap new-service-sctp6-rr -A --sctp-service [fd00::11]:9000 -s rr
cap set-service-tcp4-wrr-persist -E -t 10.96.0.10:80 -s wrr -p 600
cap set-service-udp6-rr-nopersist -E -u [fd00::10]:53 -s rr
cap new-dest-tcp4-masq-w3 -a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 3
cap new-dest-udp4-masq-w1 -a -u 10.96.0.10:53 -r 10.244.1.6:5353 -m -w 1
cap new-dest-sctp4-masq-w2 -a --sctp-service 10.96.0.11:9000 -r 10.244.1.7:9000 -m -w 2
cap new-dest-tcp6-masq-w1 -a -t [fd00::10]:80 -r [fd00:244::5]:8080 -m -w 1
cap new-dest-udp6-masq-w5 -a -u [fd00::10]:53 -r [fd00:244::6]:53 -m -w 5
cap set-dest-tcp4-w0 -e -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 0
cap set-dest-tcp6-w7 -e -t [fd00::10]:80 -r [fd00:244::5]:8080 -m -w 7
cap list -Ln
cap del-dest-tcp4 -d -t 10.96.0.10:80 -r 10.244.1.5:8080
cap del-dest-udp6 -d -u [fd00::10]:53 -r [fd00:244::6]:53
cap del-service-tcp4 -D -t 10.96.0.10:80
cap del-service-sctp6 -D --sctp-service [fd00::11]:9000
cap del-service-udp6 -D -u [fd00::10]:53
# Errors: an existing service (EEXIST), a missing one (ESRCH), a real server with no route.
cap err-exists -A -u 10.96.0.10:53 -s wrr || true
cap err-missing -D -t 10.96.0.99:80 || true
cap err-noroute -a -u 10.96.0.10:53 -r 192.0.2.1:53 -m || true
cap flush -C
/usr/sbin/ipvsadm -Ln
uname -r > $T/kernel.txt
/usr/sbin/ip link del tp-route
