"""Effectful adapters of the agent: libvirt (``libvirt_driver``) and host facts read from /proc, /sys, /dev."""
