"""Disk images: storage roots, qemu-img inspection (the I/O model issue adds more)."""
