"""parvisor: a virtualization platform on KVM/QEMU, after the Hyper-V design.

Layout (one package per layer; only adapters touch the outside world):

- ``errors``      the one error tree (refusals vs failures) and HTTP statuses
- ``model``       VM definition (versioned), sizes, lifecycle states and transitions
- ``hypervisor``  accelerator probe: KVM with vmx/svm, else TCG
- ``qmp``         the only module that speaks raw QMP
- ``vm``          QemuProcess (one class per QEMU process), argv builders, runtime paths
- ``guest``       qemu-guest-agent client (exec, heartbeat, shutdown, time)
- ``image``       the tiny guest image (Debian cloud kernel + busybox initramfs)
- ``storage``     storage roots, qemu-img
- ``store``       durable records: SQLite (standalone); etcd later, same interface
- ``ops``         operations: requests, VM manager (checks then effects), jobs,
                  reconciliation at start, stop actions at host shutdown
- ``service``     the host service process (wires config, store, manager, API)
- ``api``/``cli`` thin adapters over ``ops``
- ``testing``     fakes and crash points shared by tests

Glossary: *definition* = what a VM is (store); *state* = observed lifecycle state;
*desired state* = what the user last asked for (running/off); *runtime* = the
service's in-memory handles for a VM's QEMU; *job* = a long operation with progress.
"""

__version__ = "0.1.0"
