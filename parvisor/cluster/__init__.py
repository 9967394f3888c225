"""Failover clustering on etcd (see docs/cluster.md).

Layout: ``model`` (typed views + decisions; the glossary), ``decide`` + ``placement``
(pure decision engine), ``fencing`` (self-fence deadline, pure), ``watchdog`` (the
process that fences a frozen agent), ``env`` (the environment interface), ``agent`` and
``manager`` (the loops, identical in production and simulation), ``etcd_kv`` /
``etcd_env`` (the real environment on etcd's JSON gateway), ``certs`` (etcd TLS).
The simulated environment is ``parvisor.testing.cluster_sim``.
"""
