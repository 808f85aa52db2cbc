# A file pulled back from the L2 behind L1, and a directory.
set -eu
out=$(mktemp -d)
farm cp debian_vs_vde_amd64:/etc/motd "$out/motd"
grep -q 'project_id: example_03' "$out/motd"
farm cp -r debian_vs_user_amd64:/etc/apt "$out/apt"
test -s "$out/apt/sources.list" || ls "$out/apt"/sources.list.d/* >/dev/null
rm -rf "$out"
