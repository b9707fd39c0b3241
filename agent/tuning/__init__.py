"""Performance tuning on the agent: CPU sets, pinning and its verification, hugepages, THP, IO
schedulers, host tune profiles.

Pure parts: :mod:`agent.tuning.parse` (/sys and /proc text), :mod:`agent.tuning.cpusets`
(the configured CPU sets), :mod:`agent.tuning.profile` (what a profile would change).
Effects: :mod:`agent.tuning.sysfs` (the kernel's files under an injectable root; a simulated
host gets its own tree) and :mod:`agent.tuning.pinning` (libvirt's pinning API).
:class:`agent.tuning.module.TuningModule` is the agent module (handlers and report facts).
"""
