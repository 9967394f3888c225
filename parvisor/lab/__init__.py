"""The one-machine cluster lab (``parvisor lab ...``): hosts are network namespaces
joined by veth to a bridge, each with its etcd member, host service (agent), state dir
and local storage dir; a shared storage dir stands for NFS. See docs/cluster.md."""
