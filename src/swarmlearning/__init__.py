"""The original Swarm Learning product's client package, over swarmlearn: a model.py written for it
(`from swarmlearning.pyt import SwarmCallback`, `swarmlearning.tf`, `swarmlearning.hf_transformers`)
runs here unchanged. Each callback takes the original's arguments in the original's order and casts
them as it does; the work is done by swarmlearn's callback core (swarmlearn/callback/)."""
