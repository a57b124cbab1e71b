"""What an SL and its ML process agree on, in a module that imports nothing: the SwarmCallback reads
these without loading the SL's peer transport (and with it gRPC's TLS stack and cryptography) into
the user's training process."""

# Tensors travel in chunks of 1 MiB; the biggest single message we accept is a chunk plus framing.
CHUNK = 1 << 20
MAX_MESSAGE = CHUNK + (64 << 10)

# An ML channel on TCP (`swarm sl --ml-addr HOST:PORT`) serves only callers that present the SL's
# secret: the SL prints it as SWARM_SL_TOKEN=... in its ready line, the SWOP passes it to the ML's
# environment, and the callback sends it as this gRPC metadata key on every call.
TOKEN_ENV = "SWARM_SL_TOKEN"
TOKEN_METADATA = "swarm-sl-token"
