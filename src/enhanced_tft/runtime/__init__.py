"""What the process runs on: the device and precision policy (precision.py), torch's CPU threads and the host
allocator (threads.py), memory figures and what counts as running out of memory (memory.py).

May import: errors, config. Training and serving both stand on it; it knows neither.
"""
