"""Shared fixtures: the tiny guest image (built once, cached across runs), a real host
service per test (``host``) that is stopped, with its QEMUs, by PID afterwards, and a
one-member real etcd per test module (``etcd``; setup.sh installs etcd-server)."""

from __future__ import annotations

import pytest

from parvisor.testing.etcd_fixture import EtcdCluster

from parvisor.testing.guest_fixtures import tiny_image_for_tests
from parvisor.testing.host_fixture import HostUnderTest
from parvisor.testing.migration_fixtures import QemuSet


@pytest.fixture(scope="session")
def tiny_image():
    return tiny_image_for_tests()


@pytest.fixture
def host(tiny_image):
    host = HostUnderTest()
    host.start()
    yield host
    host.close()


@pytest.fixture
def stopped_host(tiny_image):
    """A state dir with the tiny image linked in, service not started yet."""
    host = HostUnderTest()
    yield host
    host.close()


@pytest.fixture
async def qemus():
    """Two QEMUs of one VM for the migration engine tests, stopped by PID afterwards."""
    qset = QemuSet()
    try:
        yield qset
    finally:
        await qset.close()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """A one-member etcd of this test module's own (its data dir, its ports)."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
