# L1's power cut takes its L2s with it; `farm up` repairs the lab, the L2s provisioned as
# they were (their overlays live on L1's disk).
set -eu
farm crash debian_vs_amd64
if farm exec debian_vs_amd64 -- true 2>/dev/null; then echo "L1 still answers"; exit 1; fi
farm up
farm exec debian_vs_vde_amd64 -- grep -q 'project_id: example_03' /etc/motd
farm exec debian_vs_user_amd64 -- grep -q 'project_id: example_03' /etc/motd
