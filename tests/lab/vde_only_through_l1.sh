# The VDE L2 (10.0.0.21 on `lab`) is reached from L1, which joins the network, and not
# from this machine, which does not: its ssh goes through L1.
set -eu
# An sshd's banner, not a bare connect: a network may accept any connection on its way out.
banner='exec 3<>/dev/tcp/10.0.0.21/22 && head -c 4 <&3'
reaches() { timeout 5 bash -c "$banner" 2>/dev/null | grep -q '^SSH-'; }
farm exec debian_vs_amd64 -- "timeout 5 bash -c '$banner' | grep -q '^SSH-'"
if reaches; then echo "10.0.0.21's sshd answers this machine directly"; exit 1; fi
ssh -G -F "$FARM_SSH_CONFIG" debian_vs_vde_amd64 | grep -qx 'proxyjump debian_vs_amd64'
farm exec debian_vs_vde_amd64 -- hostname
