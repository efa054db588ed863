#!/usr/bin/env bash
# nullpunch firewall lab: network namespaces with real netfilter/conntrack routers.
#
#   lab.sh up PREFIX MODE_A MODE_B   build the topology (modes: fw | nat | nat-random | nat2 | nat-map | dual)
#   lab.sh down PREFIX               remove everything PREFIX created (idempotent)
#   lab.sh loss PREFIX ROUTER PCT    drop PCT% of UDP forwarded by ROUTER (r1|r2); 0 clears
#   lab.sh udp-timeout PREFIX SECS   set both routers' conntrack UDP timeouts (unreplied, stream)
#   lab.sh counters PREFIX ROUTER    print "name packets" for the router's counters
#   lab.sh shell PREFIX HOST         an interactive shell in HOST (mgr|r1|r2|a|b|c|i1|i2)
#
# Topology (names are PREFIX + name; several labs can run side by side):
#
#   a 10.1.0.2 --+
#                +-- lan0 (bridge) r1 --wan0 198.18.0.11--+
#   c 10.1.0.3 --+                                        +-- br0 (inet) -- mgr 198.18.0.1 (manager on
#                                                         |      :80, STUN also on :81 and 198.18.0.2:80)
#   b 10.2.0.2 ----- lan0 (bridge) r2 --wan0 198.18.0.12--+
#
# c shares a's LAN and router: two peers behind one NAT. Mode `nat2` puts a second NAT
# router (i1 or i2, mode `nat`) between the LAN and the router, on a carrier-grade segment
# 100.64.N.0/24 (the router's lan0 100.64.N.1, the inner router's wan0 100.64.N.2): a double
# NAT, the LAN's addresses unchanged. Mode `nat-map` is `nat-random` plus a port-mapping
# server on the LAN side (miniupnpd: PCP, NAT-PMP and UPnP IGD), its chains hooked into the
# router's tables, its DNAT ahead of the masquerade. miniupnpd refuses a reserved WAN address,
# so that router's WAN address is 11.0.0.1N/24 instead of 198.18.0.1N (on-link routes join
# the two prefixes on the one segment; no namespace links to the root one, so nothing leaves
# the machine). Mode `dual` is `nat-random` on IPv4 plus an IPv6 LAN, 2001:db8:N::/64 (a
# 2001:db8:N::2, c 2001:db8:N::3, the router ::1), routed without NAT through the same
# stateful firewall (the `inet` table filters both families). The segment always carries
# IPv6 too: mgr 2001:db8::1, r1 2001:db8::11, r2 2001:db8::12.
#
# Each router: forward policy drop; established/related accepted; from the LAN only TCP to
# port 80 and UDP (and ICMP) go out; everything else is dropped and counted (udp_drop,
# tcp_drop). Behind NAT, unsolicited packets are addressed to the router itself and are
# dropped in its input chain, counted the same way. `nat` adds masquerade (which keeps the
# source port when it can); `nat-random` masquerades fully-random (a new port per flow).
#
# Run as root. When used from a shell, `up` installs no trap: pair it with `down` (the Rust
# driver does so on drop; scripts should `trap "lab.sh down PREFIX" EXIT`).
set -euo pipefail

cmd=${1:-}
P=${2:-}
[ -n "$cmd" ] && [ -n "$P" ] || { sed -n '2,10p' "$0"; exit 2; }
HOSTS=(inet mgr r1 r2 a b c i1 i2)
ns() { echo "${P}$1"; }
nsx() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }

router_rules() { # MODE LAN_NET
    local mode=$1
    nft -f - <<NFT
table inet lab {
    counter udp_drop { }
    counter tcp_drop { }
    counter udp_loss { }
    chain loss { }
    chain forward {
        type filter hook forward priority filter; policy drop;
        jump loss
        ct state established,related accept
        iifname "lan0" tcp dport 80 accept
        iifname "lan0" meta l4proto { udp, icmp } accept
        meta l4proto udp counter name udp_drop drop
        meta l4proto tcp counter name tcp_drop drop
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" meta l4proto udp counter name udp_drop drop
        iifname "wan0" meta l4proto tcp counter name tcp_drop drop
    }
}
NFT
    case $mode in
        fw) ;;
        nat) nft -f - <<NFT
table ip labnat {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "wan0" masquerade
    }
}
NFT
        ;;
        nat2) nft -f - <<NFT
table ip labnat {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "wan0" masquerade
    }
}
NFT
        ;;
        nat-map) nft -f - <<NFT
table ip labnat {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "wan0" masquerade fully-random
    }
}
table inet lab {
    chain miniupnpd {
    }
}
table inet labupnp {
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority srcnat - 1; policy accept;
        jump postrouting_miniupnpd
    }
}
NFT
        # Its forward chain, ahead of the established rule and the drops.
        nft insert rule inet lab forward position "$(nft -a list chain inet lab forward | awk '/ct state established/ {print $NF}')" jump miniupnpd
        ;;
        nat-random|dual) nft -f - <<NFT
table ip labnat {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "wan0" masquerade fully-random
    }
}
NFT
        ;;
        *) echo "unknown router mode $mode (fw|nat|nat-random|nat2|nat-map|dual)" >&2; return 2 ;;
    esac
}

up() {
    local mode_a=$1 mode_b=$2
    case $mode_a$mode_b in *[!a-z0-9-]*) echo "bad modes" >&2; exit 2 ;; esac
    local hosts=(inet mgr r1 r2 a b c)
    [ "$mode_a" = nat2 ] && hosts+=(i1)
    [ "$mode_b" = nat2 ] && hosts+=(i2)
    for h in "${hosts[@]}"; do
        ip netns add "$(ns "$h")"
        nsx "$h" ip link set lo up
    done
    nsx inet ip link add br0 type bridge
    nsx inet ip link set br0 up
    # Internet segment: mgr, r1, r2 on one bridge.
    for h in mgr r1 r2; do
        local dev=eth0
        [ "$h" != mgr ] && dev=wan0
        ip link add "$dev" netns "$(ns "$h")" type veth peer name "p-$h" netns "$(ns inet)"
        nsx inet ip link set "p-$h" master br0 up
        nsx "$h" ip link set "$dev" up
    done
    nsx mgr ip addr add 198.18.0.1/24 dev eth0
    # A second address: the manager's alternate STUN address (--alt-listen), so clients
    # see their mapping towards three destinations (two addresses, two ports).
    nsx mgr ip addr add 198.18.0.2/24 dev eth0
    nsx r1 ip addr add 198.18.0.11/24 dev wan0
    nsx r2 ip addr add 198.18.0.12/24 dev wan0
    # LANs: a bridge (lan0) in the LAN's gateway, a port on it per host.
    local n gw mode
    for n in 1 2; do
        mode=$mode_a
        [ "$n" = 2 ] && mode=$mode_b
        gw=r$n
        nsx "r$n" ip link add lan0 type bridge
        nsx "r$n" ip link set lan0 up
        if [ "$mode" = nat2 ]; then
            # The carrier-grade segment between the router and the inner NAT router.
            gw=i$n
            nsx "r$n" ip addr add "100.64.$n.1/24" dev lan0
            ip link add "l-i$n" netns "$(ns "r$n")" type veth peer name wan0 netns "$(ns "i$n")"
            nsx "r$n" ip link set "l-i$n" master lan0 up
            nsx "i$n" ip addr add "100.64.$n.2/24" dev wan0
            nsx "i$n" ip link set wan0 up
            nsx "i$n" ip route add default via "100.64.$n.1"
            nsx "i$n" ip link add lan0 type bridge
            nsx "i$n" ip link set lan0 up
            nsx "i$n" sysctl -qw net.ipv4.ip_forward=1
            nsx "i$n" bash -c "$(declare -f router_rules); router_rules nat"
        fi
        nsx "$gw" ip addr add "10.$n.0.1/24" dev lan0
    done
    # A LAN switch is not the router's firewall: bridged frames skip netfilter (the kernel
    # has br_netfilter built in, which would otherwise pass them through the IP hooks).
    for h in r1 r2 i1 i2; do
        if ip netns list | grep -qw "^$(ns "$h")"; then
            nsx "$h" sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 \
                net.bridge.bridge-nf-call-arptables=0
        fi
    done
    local h host_ip
    for h in a b c; do
        case $h in a) n=1; host_ip=10.1.0.2 ;; b) n=2; host_ip=10.2.0.2 ;; c) n=1; host_ip=10.1.0.3 ;; esac
        gw=r$n
        ip netns list | grep -qw "^$(ns "i$n")" && gw=i$n
        ip link add "l-$h" netns "$(ns "$gw")" type veth peer name eth0 netns "$(ns "$h")"
        nsx "$gw" ip link set "l-$h" master lan0 up
        nsx "$h" ip addr add "$host_ip/24" dev eth0
        nsx "$h" ip link set eth0 up
        nsx "$h" ip route add default via "10.$n.0.1"
    done
    # Routes for the un-NATed (fw) case: the LANs are reachable through their routers.
    nsx mgr ip route add 10.1.0.0/24 via 198.18.0.11
    nsx mgr ip route add 10.2.0.0/24 via 198.18.0.12
    nsx r1 ip route add 10.2.0.0/24 via 198.18.0.12
    nsx r2 ip route add 10.1.0.0/24 via 198.18.0.11
    for r in r1 r2; do
        nsx "$r" sysctl -qw net.ipv4.ip_forward=1
    done
    # IPv6 on the segment (no duplicate address detection: addresses usable at once).
    nsx mgr ip -6 addr add 2001:db8::1/64 dev eth0 nodad
    nsx r1 ip -6 addr add 2001:db8::11/64 dev wan0 nodad
    nsx r2 ip -6 addr add 2001:db8::12/64 dev wan0 nodad
    for n in 1 2; do
        mode=$mode_a
        [ "$n" = 2 ] && mode=$mode_b
        [ "$mode" = dual ] || continue
        # An IPv6 LAN, routed: the other router and the manager reach it through this one.
        nsx "r$n" sysctl -qw net.ipv6.conf.all.forwarding=1
        nsx "r$n" ip -6 addr add "2001:db8:$n::1/64" dev lan0 nodad
        nsx mgr ip -6 route add "2001:db8:$n::/64" via "2001:db8::1$n"
        nsx "r$((3 - n))" ip -6 route add "2001:db8:$n::/64" via "2001:db8::1$n"
        local h6
        for h6 in a c; do
            [ "$n" = 2 ] && [ "$h6" = c ] && continue
            local host=$h6 last=2
            [ "$n" = 2 ] && host=b
            [ "$h6" = c ] && last=3
            nsx "$host" ip -6 addr add "2001:db8:$n::$last/64" dev eth0 nodad
            nsx "$host" ip -6 route add default via "2001:db8:$n::1"
        done
    done
    nsx r1 bash -c "$(declare -f router_rules); router_rules $mode_a"
    nsx r2 bash -c "$(declare -f router_rules); router_rules $mode_b"
    for n in 1 2; do
        mode=$mode_a
        [ "$n" = 2 ] && mode=$mode_b
        [ "$mode" = nat-map ] || continue
        # A WAN address miniupnpd accepts, joined on-link to the segment's prefix.
        nsx "r$n" ip addr del "198.18.0.1$n/24" dev wan0
        nsx "r$n" ip addr add "11.0.0.1$n/24" dev wan0
        nsx "r$n" ip route add 198.18.0.0/24 dev wan0
        nsx "r$n" ip route add 11.0.0.0/24 dev wan0 2>/dev/null || true
        nsx mgr ip route add 11.0.0.0/24 dev eth0 2>/dev/null || true
        local other=$((3 - n)) other_wan="198.18.0.1$((3 - n))"
        [ "$(eval echo "\$mode_$( [ "$other" = 1 ] && echo a || echo b)")" = nat-map ] && other_wan="11.0.0.1$other"
        nsx "r$other" ip route add 11.0.0.0/24 dev wan0 2>/dev/null || true
        # Removing the old address took the route to the other LAN (a `fw` LAN is routed).
        nsx "r$n" ip route replace "10.$other.0.0/24" via "$other_wan" dev wan0 onlink
        local conf="/tmp/${P}miniupnpd-r$n.conf"
        cat > "$conf" <<CONF
ext_ifname=wan0
listening_ip=lan0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=no
uuid=3f6b1a1e-2c4d-4e5f-8a9b-0c1d2e3f4a5$n
upnp_table_name=lab
upnp_nat_table_name=labupnp
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
allow 1024-65535 10.$n.0.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
        nsx "r$n" miniupnpd -f "$conf" -P "/tmp/${P}miniupnpd-r$n.pid" -d > "/tmp/${P}miniupnpd-r$n.log" 2>&1 &
        # Ready when it listens for PCP / NAT-PMP.
        local i
        for i in $(seq 50); do
            grep -q "Listening for NAT-PMP/PCP" "/tmp/${P}miniupnpd-r$n.log" 2>/dev/null && break
            sleep 0.1
        done
        grep -q "Listening for NAT-PMP/PCP" "/tmp/${P}miniupnpd-r$n.log" || { echo "miniupnpd did not start:" >&2; cat "/tmp/${P}miniupnpd-r$n.log" >&2; return 1; }
    done
}

down() {
    rm -f "/tmp/${P}"miniupnpd-r?.conf "/tmp/${P}"miniupnpd-r?.pid "/tmp/${P}"miniupnpd-r?.log
    for h in "${HOSTS[@]}"; do
        local n
        n=$(ns "$h")
        if ip netns list | grep -qw "^$n"; then
            ip netns pids "$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
            ip netns del "$n" 2>/dev/null || true
        fi
    done
}

case $cmd in
    up)
        [ $# -eq 4 ] || { echo "usage: lab.sh up PREFIX MODE_A MODE_B" >&2; exit 2; }
        # Build atomically: on any failure, remove what was made.
        trap 'down' ERR
        up "$3" "$4"
        trap - ERR
        ;;
    down) down ;;
    loss)
        nsx "$3" nft flush chain inet lab loss
        if [ "$4" -gt 0 ]; then
            nsx "$3" nft add rule inet lab loss meta l4proto udp numgen random mod 100 "<" "$4" counter name udp_loss drop
        fi
        ;;
    udp-timeout)
        for r in r1 r2; do
            nsx "$r" sysctl -qw net.netfilter.nf_conntrack_udp_timeout="$3"
            nsx "$r" sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream="$3"
        done
        ;;
    counters)
        for c in udp_drop tcp_drop udp_loss; do
            echo "$c $(nsx "$3" nft list counter inet lab "$c" | awk '/packets/ {for (i=1;i<=NF;i++) if ($i=="packets") print $(i+1)}')"
        done
        ;;
    shell) nsx "$3" bash ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
