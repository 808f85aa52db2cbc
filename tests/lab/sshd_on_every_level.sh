# Every level answers: sshd listens on both L2s, and L1 runs them as libvirt domains.
set -eu
farm wait debian_vs_user_amd64 --port 22 --timeout 60
farm wait debian_vs_vde_amd64 --port 22 --timeout 60
farm wait debian_vs_amd64 --unit libvirtd --timeout 60
farm exec debian_vs_amd64 -- virsh list --name | grep -qx debian_vs_vde_amd64
