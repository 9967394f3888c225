"""Guest images for parvisor: the tiny Debian-kernel + busybox guest (see ``tiny``)."""
