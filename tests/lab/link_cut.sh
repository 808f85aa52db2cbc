# The VDE L2's cable cut: L1 no longer reaches it; plugged back, it answers again.
set -eu
# An sshd's banner read from L1.
reach_from_l1() {
  farm exec debian_vs_amd64 -- \
    "timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.0.21/22 && head -c 4 <&3' | grep -q '^SSH-'"
}
farm link debian_vs_vde_amd64 lab down
if reach_from_l1; then echo "the cut link still carries"; exit 1; fi
farm link debian_vs_vde_amd64 lab up
farm wait debian_vs_vde_amd64 --until true --timeout 120
reach_from_l1
