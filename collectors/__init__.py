"""Sources of readings: NVML GPUs, the simulator, coolant sensors. Never imports ``rules``."""
