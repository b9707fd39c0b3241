"""The security tier: issue 12's attacks reproduced against a live fleet (real RabbitMQ, agent
processes on libvirt's test driver, the real qemu-img); each asserts the attack has no effect."""
