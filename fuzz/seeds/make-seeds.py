#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/seeds/<target>/) from the project's own
captured vectors and golden inputs, so that every seed is something the agent really reads:

- yaml_plan: each file of examples/cluster (the golden tests' input), and the bad objects
  listed in BAD_OBJECTS (wrong types, unknown fields, a Node without addresses, ...).
- ipvs_netlink: every message the kernel sent in the ipvsadm captures
  (agent/src/dataplane/ipvs/netlink/testdata/<kernel>/*.txt), one seed per capture holding
  its received messages back to back, as a datagram carries them.
- nft_json: agent/src/dataplane/ipvs/nft/testdata/small.json.
- conntrack_netlink: dump replies built from the layout of the conntrack unit tests
  (IPv4 UDP, IPv6 SCTP, with a zone, then NLMSG_DONE), in the kernel's byte order.
- config_file: the config.yaml of manifests/base/configmap.yaml, the overlays' patches'
  keys, and a few edge cases.

Files named regression-* are inputs the fuzzers crashed on; they are kept by hand (this script
never writes or removes them), each with its regression test.

Run from the repository root: python3 fuzz/seeds/make-seeds.py
"""
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def write(target, name, data):
    directory = os.path.join(SEEDS, target)
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(directory, name), "wb") as out:
        out.write(data)


BAD_OBJECTS = {
    "service-wrong-types.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\n"
    "spec: {clusterIP: [1, 2], ports: {port: 80}}\n",
    "service-unknown-fields.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: shop, bogus: 1}\n"
    "spec: {clusterIP: 10.96.50.1, frobnicate: true, ports: [{port: 80, protocol: TCP, colour: red}]}\n",
    "service-duplicate-clusterip.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: aaa-dup, namespace: aaa}\n"
    "spec: {clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}]}\n",
    "service-bad-ports.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: ports, namespace: shop}\n"
    "spec: {clusterIP: 10.96.50.2, ports: [{port: 0}, {port: 70000}, {port: 80, protocol: ICMP}, {port: 81}]}\n",
    "node-without-addresses.yaml": "apiVersion: v1\nkind: Node\nmetadata: {name: node-x, labels: {topology.kubernetes.io/zone: b}}\n",
    "slice-ipv6-zone.yaml": "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
    "metadata: {name: z, namespace: shop, labels: {kubernetes.io/service-name: cart}}\n"
    "addressType: IPv6\nports: [{name: http, port: 8080, protocol: TCP}]\n"
    "endpoints: [{addresses: ['fe80::1%eth0', 'fd00::5']}]\n",
    "slice-wrong-family.yaml": "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
    "metadata: {name: w, namespace: shop, labels: {kubernetes.io/service-name: cart}}\n"
    "addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n"
    "endpoints: [{addresses: ['fd00::5', 'not-an-ip', 10.244.9.9], zone: b, hints: {forZones: [{name: b}]}}]\n",
    "list-of-mixed.yaml": "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: l}, spec: {ports: [{port: 1}]}}\n"
    "- 42\n- {kind: ServiceList, apiVersion: v1, items: [{metadata: {name: m}}]}\n",
    "merge-keys.yaml": "base: &b {apiVersion: v1, kind: Service}\n---\n<<: *b\nmetadata: {name: merged, namespace: shop}\n"
    "spec: {clusterIP: 10.96.50.3, ports: [{port: 80}]}\n",
}


def yaml_plan():
    cluster = os.path.join(ROOT, "examples", "cluster")
    for directory, _, files in sorted(os.walk(cluster)):
        for name in sorted(files):
            with open(os.path.join(directory, name), "rb") as source:
                write("yaml_plan", "example-" + name, source.read())
    for name, text in BAD_OBJECTS.items():
        write("yaml_plan", name, text)
    write("yaml_plan", "not-utf8.yaml", b"apiVersion: v1\nkind: Service\nmetadata: {name: \xff\xfe}\n")


def ipvs_netlink():
    testdata = os.path.join(ROOT, "agent", "src", "dataplane", "ipvs", "netlink", "testdata")
    for kernel in sorted(os.listdir(testdata)):
        folder = os.path.join(testdata, kernel)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            received = b""
            with open(os.path.join(folder, name)) as capture:
                for line in capture:
                    if line.startswith("< "):
                        message = bytes.fromhex(line[2:].strip())
                        received += message + b"\0" * (-len(message) % 4)
            if received:
                write("ipvs_netlink", f"{kernel}-{name[:-4]}", received)


def nla(kind, payload, nested=False):
    kind |= 0x8000 if nested else 0
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


def tuple_attrs(family, protocol, source, destination, sport, dport):
    if family == 4:
        ip = nla(1, bytes(source)) + nla(2, bytes(destination))
    else:
        ip = nla(3, bytes(source)) + nla(4, bytes(destination))
    proto = nla(1, bytes([protocol])) + nla(2, struct.pack(">H", sport)) + nla(3, struct.pack(">H", dport))
    return nla(1, ip, True) + nla(2, proto, True)


def netlink(kind, flags, sequence, payload):
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, sequence, 0) + payload


def conntrack_netlink():
    ct_new = (1 << 8) | 0  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW
    multi = 0x2
    v4 = bytes([2, 0, 0, 0]) + nla(1, tuple_attrs(4, 17, [10, 0, 0, 5], [10, 96, 0, 10], 40000, 53), True) \
        + nla(2, tuple_attrs(4, 17, [10, 244, 1, 2], [10, 0, 0, 5], 5353, 40000), True) \
        + nla(7, struct.pack(">I", 30))
    v6_src = bytes.fromhex("fd000000000000000000000000000005")
    v6_vip = bytes.fromhex("fd000096000000000000000000000010")
    v6_backend = bytes.fromhex("fd000244000000000000000000000002")
    v6 = bytes([10, 0, 0, 0]) + nla(1, tuple_attrs(6, 132, v6_src, v6_vip, 40000, 3868), True) \
        + nla(2, tuple_attrs(6, 132, v6_backend, v6_src, 3868, 40000), True) \
        + nla(18, struct.pack(">H", 7))
    done = netlink(3, multi, 1, struct.pack("=i", 0))
    write("conntrack_netlink", "dump-udp4", netlink(ct_new, multi, 1, v4) + done)
    write("conntrack_netlink", "dump-sctp6-zone", netlink(ct_new, multi, 1, v6) + done)
    write("conntrack_netlink", "dump-two", netlink(ct_new, multi, 1, v4) + netlink(ct_new, multi, 1, v6) + done)
    error = netlink(2, 0, 1, struct.pack("=i", -2) + netlink(ct_new, 0, 1, b""))
    write("conntrack_netlink", "error-enoent", error)


def nft_json():
    path = os.path.join(ROOT, "agent", "src", "dataplane", "ipvs", "nft", "testdata", "small.json")
    with open(path, "rb") as source:
        write("nft_json", "small.json", source.read())
    write("nft_json", "empty-table.json", '{"nftables": [{"metainfo": {"json_schema_version": 1}}]}')


def config_file():
    path = os.path.join(ROOT, "manifests", "base", "configmap.yaml")
    with open(path) as source:
        text = source.read()
    body = text.split("config.yaml: |\n", 1)[1]
    lines = [line[4:] for line in body.splitlines() if line.startswith("    ")]
    write("config_file", "configmap.yaml", "\n".join(lines) + "\n")
    write("config_file", "absurd-durations.yaml", "sync-period: 300000000000y\nmin-sync-period: 0\n"
          "source-poll-period: 1ns\nipvs-drain-timeout: 365d\n")
    write("config_file", "ebpf.yaml", "proxy-mode: ebpf\nbpf-pin-dir: /sys/fs/bpf/topoproxy\n"
          "cgroup-path: /sys/fs/cgroup\ntopology-default: zone\n")
    write("config_file", "ipvs-cidrs.yaml", "cluster-cidr: 10.244.0.0/16, fd00:10:244::/56\n"
          "ipvs-exclude-cidrs: 10.200.0.0/16\nipvs-strict-arp: true\nmasquerade-all: true\n")


if __name__ == "__main__":
    yaml_plan()
    ipvs_netlink()
    nft_json()
    conntrack_netlink()
    config_file()
    sys.exit(0)
