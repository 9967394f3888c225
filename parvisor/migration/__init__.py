"""Live migration, QEMU side: the convergence policy (pure) and the engine (QMP).

The cluster protocol (phases, ownership switch) calls ``parvisor.migration.engine``;
docs/live-migration.md describes both."""
