#!/usr/bin/env bash
# Installs the system packages farm needs on Debian 12, once. Idempotent and quiet when
# everything is present, so the README's commands and CI can always run it first.
set -euo pipefail

# qemu-system-x86 and qemu-utils must be installed together: installing qemu-system-x86
# alone on these machines removes a backported qemu-utils and leaves no qemu-img.
packages=(
  qemu-system-x86 qemu-utils   # VMs and qcow2 layers
  mmdebstrap e2fsprogs          # Debian images from a mirror, without mounting
  openssh-client rsync          # reaching VMs (ssh, ssh-keygen, scp) and copying to them
  openssh-server b3sum          # tests: a "remote" host on 127.0.0.1 (sshd; b3sum on hosts)
  vde2 iproute2                 # VDE networks: vde_switch, vde_plug, taps (ip)
  curl                          # the download benchmark's baseline
  zstd                          # the export benchmark's baseline (tar --zstd)
  python3-venv                  # tests: the S3-compatible server below
  docker-registry               # tests: an OCI registry (the distribution project's registry:2)
  skopeo                        # the OCI cache benchmark's baseline (skopeo copy); tests: containerDisks
  grub-pc-bin grub-common       # `farm image export`: GRUB for BIOS in front of a disk farm boots by kernel
  vagrant vagrant-libvirt dnsmasq-base  # tests: a real Vagrant brings an exported box up on libvirtd
  nginx                         # tests: a binary cache over HTTP (GET, HEAD, PUT via http_dav)
  ovmf                          # UEFI firmware for x86_64 VMs (`firmware = "uefi"`)
  qemu-system-arm qemu-efi-aarch64  # aarch64 VMs (TCG) and their UEFI firmware (AAVMF)
  qemu-user-static arch-test    # arm64 programs on this host: maintainer scripts (mmdebstrap
                                #   asks arch-test), the arm64 busybox's applet list
  fdisk dosfstools mtools       # tests: the cloud-image fixture's GPT disk and EFI partition
  libvirt-dev                   # building farm: the `virt` crate links libvirt
  libvirt-daemon-system libvirt-clients  # the libvirt backend: libvirtd (started by its tests), virsh
  libguestfs-tools              # the cloud-image benchmark's baseline (virt-customize),
  linux-image-cloud-amd64       #   whose appliance boots the host's kernel (nothing else does)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-img must come from the same QEMU as qemu-system (see above).
if ! command -v qemu-img >/dev/null || ! command -v qemu-system-x86_64 >/dev/null; then
  missing+=(qemu-system-x86 qemu-utils)
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # These machines ship a backported qemu-utils that no qemu-system in the configured
  # suites matches; pin both to qemu-system-x86's candidate so apt may downgrade it.
  version=$(apt-cache show --no-all-versions qemu-system-x86 | sed -n 's/^Version: //p' | head -n1)
  pinned=()
  for p in "${missing[@]}"; do
    case "$p" in
      qemu-system-x86|qemu-utils) pinned+=("$p=$version") ;;
      *) pinned+=("$p") ;;
    esac
  done
  pinned+=("qemu-utils=$version")
  # Installing openssh-server must not start a system sshd: the tests run their own.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends --allow-downgrades \
    $(printf '%s\n' "${pinned[@]}" | sort -u) >/dev/null
fi

# arm64 maintainer scripts (Debian arm64 images built by mmdebstrap) run through qemu's
# user-mode emulator, which the kernel finds through binfmt_misc. systemd-binfmt registers it
# at boot on a normal system; on a machine without systemd, register it here (non-fatal: only
# arm64 Debian images need it, and farm says so when it is missing).
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/qemu-aarch64" ]; then
  { [ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt"; } 2>/dev/null &&
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$binfmt/register" 2>/dev/null ||
    echo "setup: could not register qemu-aarch64 with binfmt_misc; arm64 Debian images will not build" >&2
fi

# Tests: an S3-compatible server (moto's server mode, from PyPI) in a venv of its own, so
# nothing of the system's Python changes.
venv=/opt/farm-test-venv
moto_version=5.2.5
if ! "$venv/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
  echo "setup: installing moto[server]==$moto_version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$moto_version"
fi

# The clients people use with such labs, from PyPI in a venv of their own: Ansible (the
# bundled lab's provisioning: `farm up` runs ansible/guest_provision.yml), pytest-testinfra
# and pyinfra (the README's "Use it with your tools", and the tests' labs); junitparser, a
# consumer of `farm test --junit`'s reports.
ansible_venv=/opt/farm-ansible
lab_clients=(ansible-core==2.19.4 pytest-testinfra==10.2.2 pyinfra==3.10.0 junitparser==3.2.0)
installed=$("$ansible_venv/bin/pip" freeze 2>/dev/null | grep -cxF -f <(printf '%s\n' "${lab_clients[@]}") || true)
if [ "${installed:-0}" -ne ${#lab_clients[@]} ]; then
  echo "setup: installing ${lab_clients[*]} into $ansible_venv" >&2
  python3 -m venv "$ansible_venv"
  "$ansible_venv/bin/pip" install -q --disable-pip-version-check "${lab_clients[@]}"
fi
# On PATH for farm and the user, unless this machine already has its own.
for tool in ansible ansible-playbook ansible-inventory pyinfra; do
  command -v "$tool" >/dev/null || ln -s "$ansible_venv/bin/$tool" "/usr/local/bin/$tool"
done

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup)" >&2; exit 1; }

# The test runner (`scripts/test.sh`): these machines ship cargo-nextest with Rust; anywhere
# else it comes from crates.io (a few minutes to build, once).
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest from crates.io" >&2
  cargo install --locked --quiet cargo-nextest
fi
