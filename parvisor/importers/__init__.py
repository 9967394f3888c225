"""Migration in: Virtual Server 2005 / Virtual PC ``.vmc``, VHD validation and chains,
OVF/OVA. Parsers and pure planning only; conversion (qemu-img) and VM creation are wired
by the ops layer on top of these modules.

- ``vmc``  ``parse_vmc`` -> ``VmcConfig``; ``plan_vmc_import`` -> ``ImportPlan`` (pure)
- ``vhd``  ``read_vhd`` -> ``VhdInfo``; ``resolve_chain`` -> ``VhdChain`` (+ copy plan)
- ``ovf``  ``parse_ovf_bytes``/``load_ovf``/``open_ova``/``extract_ova``

Every refusal is ``parvisor.errors.InvalidInput`` naming the file and the field.
"""
