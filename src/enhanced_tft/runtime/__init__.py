"""Runtime: devices, precision policy, CPU threads, memory figures and the out-of-memory back-off."""
