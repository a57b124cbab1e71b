"""The ML side: the core both SwarmCallbacks share (swarmlearn.hf for Hugging Face Trainer,
swarmlearn.torch for plain PyTorch loops)."""
