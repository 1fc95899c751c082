"""Dev and demo tooling: ComfyUI server launcher, API client, demo and benchmarks."""
