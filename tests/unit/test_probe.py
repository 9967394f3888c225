import pytest

from parvisor.errors import InvalidInput
from parvisor.hypervisor.probe import choose_accelerator


def test_kvm_needs_both_dev_kvm_and_vmx_or_svm():
    assert choose_accelerator(kvm_opens=True, cpu_flags=frozenset({"vmx"}),
                              override=None).accelerator == "kvm"
    assert choose_accelerator(kvm_opens=True, cpu_flags=frozenset({"svm"}),
                              override=None).accelerator == "kvm"


def test_dev_kvm_without_extensions_is_tcg_and_says_why():
    choice = choose_accelerator(kvm_opens=True, cpu_flags=frozenset({"sse2"}), override=None)
    assert choice.accelerator == "tcg"
    assert "vmx" in choice.reason and "TCG" in choice.warning


def test_no_dev_kvm_is_tcg():
    choice = choose_accelerator(kvm_opens=False, cpu_flags=frozenset({"vmx"}), override=None)
    assert choice.accelerator == "tcg" and "/dev/kvm" in choice.reason


def test_override():
    assert choose_accelerator(kvm_opens=False, cpu_flags=frozenset(),
                              override="kvm").accelerator == "kvm"
    with pytest.raises(InvalidInput):
        choose_accelerator(kvm_opens=False, cpu_flags=frozenset(), override="xen")
