# shellcheck shell=bash disable=SC2034  # constants used by the scripts that source it
# Shared helpers for the soft-roce/ scripts. Sourced, never executed.
#
# Everything here must stay cheap: rxe-setup also runs inside the TCG guest,
# where every process started costs 50-100 ms, so sysfs is read with bash
# builtins instead of helper processes wherever possible.

# The veth pair rxe-setup builds: two "hosts" on one kernel. TEST-NET-1
# (RFC 5737) addresses, never routed anywhere.
readonly RXE_DEV_A=rxe_a RXE_NETDEV_A=va RXE_ADDR_A=192.0.2.1
readonly RXE_DEV_B=rxe_b RXE_NETDEV_B=vb RXE_ADDR_B=192.0.2.2
readonly RXE_PREFIX_LEN=24
# Routing tables for the policy routing that sends traffic between the two
# local addresses out of the veth (4791 is the RoCEv2 UDP port).
readonly RXE_TABLE_A=4791 RXE_TABLE_B=4792

# Modules Soft-RoCE needs, in load order. crc32_generic first: without a
# crc32 shash, rdma_rxe 6.1 fails to create a device ("failed to init crc32
# algorithm err:-2"; `rdma link add` says "No such file or directory").
# Some of these do not exist on other kernels (crc32_pclmul off x86, the
# crc32 modules once crc32 became a library); only the ones named in
# RXE_REQUIRED_MODULES must end up present. sch_tbf: the slow-link resync
# test throttles the veths with a token bucket.
readonly RXE_MODULES=(crc32_generic crc32_pclmul udp_tunnel ip6_udp_tunnel ib_core
	ib_uverbs rdma_rxe configfs ib_cm iw_cm rdma_cm rdma_ucm ib_umad veth sch_tbf)
readonly RXE_REQUIRED_MODULES=(ib_core ib_uverbs rdma_rxe rdma_ucm)

# Debian packages: what rxe-setup needs on a host with rdma_rxe, and what
# run-in-guest needs on a host without it (the guest runs the host's own
# binaries, so the RDMA user space is installed on the host).
readonly RXE_HOST_PACKAGES=(iproute2 kmod libibverbs1 ibverbs-providers librdmacm1)
readonly GUEST_HOST_PACKAGES=(qemu-system-x86 busybox-static cpio kmod xz-utils zstd
	iproute2 libibverbs1 ibverbs-providers librdmacm1 ibverbs-utils rdmacm-utils perftest)

PROG=${0##*/}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# missing_packages PKG...: prints the Debian packages that are not installed.
# One dpkg-query for all of them (cheap inside the guest).
missing_packages() {
	local line installed=" "
	while read -r line; do
		[[ $line == "installed "* ]] && installed+="${line#installed } "
	done < <(dpkg-query -W -f='${db:Status-Status} ${Package}\n' "$@" 2>/dev/null || true)
	local pkg
	for pkg in "$@"; do
		[[ $installed == *" $pkg "* ]] || printf '%s\n' "$pkg"
	done
}

# ensure_packages PKG...: installs what is missing when we are root on a
# Debian-like system; otherwise fails with the command that would fix it.
ensure_packages() {
	command -v dpkg-query >/dev/null || {
		log "not a Debian-like system: make sure these (or your distribution's equivalents) are installed: $*"
		return 0
	}
	local missing
	mapfile -t missing < <(missing_packages "$@")
	((${#missing[@]} == 0)) && return 0
	if ((EUID != 0)); then
		die "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}"
	fi
	log "installing Debian packages: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
		die "apt-get update failed"
	# --no-remove: never make room by removing something (qemu-system-x86
	# from bookworm would remove a qemu-utils from bookworm-backports).
	if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-remove "${missing[@]}" >&2; then
		return 0
	fi
	# The project's build machines carry qemu-utils from bookworm-backports
	# while their sources list only bookworm: take the qemu packages from the
	# release qemu-utils came from, through a temporary sources directory
	# (the system's own sources are left as they are).
	if [[ $(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) == *bpo12* ]]; then
		log "qemu-utils comes from bookworm-backports: installing the qemu packages from there too"
		local parts
		parts=$(mktemp -d /tmp/nvmirror-apt.XXXXXX)
		cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list "$parts"/ 2>/dev/null || true
		if [[ -s /etc/apt/sources.list ]]; then
			cp /etc/apt/sources.list "$parts"/system.list
		fi
		printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$parts"/nvmirror-backports.sources
		local apt_options=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$parts")
		if DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" update -q >&2 &&
			DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" install -y -q --no-install-recommends --no-remove \
				-t bookworm-backports "${missing[@]}" >&2; then
			rm -rf "$parts"
			return 0
		fi
		rm -rf "$parts"
	fi
	die "apt-get install ${missing[*]} failed (see above); if it would have to remove packages, install ${missing[*]} by hand in versions that fit the installed ones (e.g. qemu-system-x86 from the same release as qemu-utils: apt-get install -t bookworm-backports qemu-system-x86)"
}

# ipv4_to_gid ADDR: the IPv4-mapped GID as sysfs prints it
# (192.0.2.1 -> 0000:0000:0000:0000:0000:ffff:c000:0201).
ipv4_to_gid() {
	local a b c d
	IFS=. read -r a b c d <<<"$1"
	printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' "$a" "$b" "$c" "$d"
}

# roce_v2_gid_index DEV [ADDR]: prints the index of DEV's port-1 RoCEv2 GID
# that carries IPv4 address ADDR (any IPv4-mapped GID without ADDR). The
# index depends on the kernel and on which IPv6 addresses the netdev has, so
# it is looked up, never assumed. Returns 1 when there is none (yet).
roce_v2_gid_index() {
	local want="" port=/sys/class/infiniband/$1/ports/1
	[[ -n ${2:-} ]] && want=$(ipv4_to_gid "$2")
	local path gid type index
	for path in "$port"/gids/*; do
		[[ -r $path ]] || continue
		index=${path##*/}
		read -r gid 2>/dev/null <"$path" || continue
		if [[ -n $want ]]; then
			[[ $gid == "$want" ]] || continue
		else
			[[ $gid == 0000:0000:0000:0000:0000:ffff:* ]] || continue
		fi
		# Unpopulated entries fail to read; a populated one says "RoCE v2"
		# or "IB/RoCE v1".
		read -r type 2>/dev/null <"$port/gid_attrs/types/$index" || continue
		[[ $type == "RoCE v2" ]] || continue
		printf '%s\n' "$index"
		return 0
	done
	return 1
}

# wait_for_gid_index DEV ADDR: the IPv4 GID is added asynchronously (by the
# kernel's RoCE GID work queue) after the device or the address appears;
# poll for it for up to ~10 s (under TCG it takes a moment).
wait_for_gid_index() {
	local tries
	for ((tries = 0; tries < 100; tries++)); do
		roce_v2_gid_index "$@" && return 0
		sleep 0.1
	done
	return 1
}

# rxe_on_netdev NETDEV: prints the name of an RDMA device bound to NETDEV
# (rxe keeps one device per netdev). Returns 1 when there is none.
rxe_on_netdev() {
	local ndev_file ndev
	for ndev_file in /sys/class/infiniband/*/ports/1/gid_attrs/ndevs/0; do
		read -r ndev 2>/dev/null <"$ndev_file" || continue
		if [[ $ndev == "$1" ]]; then
			ndev_file=${ndev_file#/sys/class/infiniband/}
			printf '%s\n' "${ndev_file%%/*}"
			return 0
		fi
	done
	return 1
}

# remove_policy_rules: deletes our rules (by their full selector, so nothing
# else is touched). Used by rxe-setup and rxe-teardown.
remove_policy_rules() {
	while ip -4 rule del pref 0 iif lo to "$RXE_ADDR_B" lookup "$RXE_TABLE_A" 2>/dev/null; do :; done
	while ip -4 rule del pref 0 iif lo to "$RXE_ADDR_A" lookup "$RXE_TABLE_B" 2>/dev/null; do :; done
}
