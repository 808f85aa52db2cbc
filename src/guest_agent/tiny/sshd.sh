#!/bin/sh
# Started (and restarted) by init. With the seeded host key only that key is offered, so the
# key farm pinned in known_hosts is the one the client meets; without one dropbear makes a
# key on first connection (-R).
key=/etc/dropbear/dropbear_ed25519_host_key
if [ -s "$key" ]; then
    exec /usr/sbin/dropbear -F -E -s -p 22 -r "$key"
fi
exec /usr/sbin/dropbear -F -E -s -p 22 -R
