"""What a certificate may be: each role runs one component; `ui` only reads, `admin` is the operator who
trusts other organizations' CAs, revokes or maps certificates and changes the default contract's limits.

Its own module, free of third-party imports, so that the CLI can offer these names at start-up without
loading pki (and cryptography)."""

ROLES = ("sn", "sl", "swop", "swci", "ui", "admin")
# The roles whose components run under a name an admin mapped a role-less certificate to (--node-id).
MAPPABLE_ROLES = ("sn", "sl", "swop")
