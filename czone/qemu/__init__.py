"""QEMU process management: pure command lines and the running machine."""
