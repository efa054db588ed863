# Shared helpers for scripts/demo and scripts/test.

need_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install a Rust toolchain (https://rustup.rs) and retry" >&2
        exit 2
    fi
}

# System packages, installed with apt-get when missing (as root, or with sudo); nothing is
# installed when everything is present.
# To build: cmake and a C compiler build libopus (the opus crate's bundled copy); cpal's
# ALSA binding needs pkg-config and the ALSA headers.
BUILD_PACKAGES=(cmake pkg-config libasound2-dev)
# To test: the firewall lab (namespaces, nftables routers, conntrack), speech synthesis and
# resampling, RTP tools no one here wrote (ffmpeg, GStreamer, tshark), and a private
# PulseAudio server with null sinks for the sound-device test; python3 forges packets in the
# lab's attacker test, openssl is the stock TLS client of the manager tests, nats-server the
# cluster's engine in the cluster tests.
TEST_PACKAGES=(iproute2 nftables iptables conntrack espeak-ng sox ffmpeg tshark
    gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
    pulseaudio pulseaudio-utils miniupnpd-nftables python3 openssl nats-server)
SYSTEM_PACKAGES=("${BUILD_PACKAGES[@]}")

install_system_packages() {
    local missing=()
    for p in "${SYSTEM_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "== installing system packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq -o DPkg::Lock::Timeout=300
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${missing[@]}"
}
