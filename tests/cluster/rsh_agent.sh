#!/bin/sh
# rsh agent for virtual multi-host mpirun in tests (see tests/cluster/mpi.py).
# Open MPI calls it as `rsh_agent.sh HOST COMMAND...`; instead of logging in to HOST it runs
# COMMAND here, in a private UTS namespace whose host name is HOST, so each Open MPI daemon
# (and the ranks it starts) sees its own node.
host=$1
shift
exec unshare --uts /bin/sh -c 'hostname "$1" && shift && exec /bin/sh -c "$*"' rsh_agent "$host" "$@"
