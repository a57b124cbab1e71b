"""The ledger's policy, on the pure state machine: which certificate role may submit which transaction
kind (checked against a matrix written out by hand here, not generated from the policy table), and
the identity rules an attacker holding one certificate of the swarm runs into: roles and names come
from certificates, CAs issue only for their own organization and granted roles, revoked
certificates are refused, declared sizes and min_peers are bounded by the contract's limits."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ledger_ids import CONTRACT, RUNNER, ca_pem, fingerprints, genesis_payload, ident, reg, tx
from swarmlearn import pki
from swarmlearn.errors import Rejected
from swarmlearn.ledger import LedgerState
from swarmlearn.ledger.policy import POLICY, policy_table

FP = fingerprints()
ROLE_HOLDERS = {"sn": "sn-1", "sl": "node1", "swop": "swop-1", "swci": "swci-1", "ui": "ui-1", "admin": "admin-1"}

# Written by hand from the security model in the README: who may submit each kind.
EVERYONE_BUT_UI = {"sn", "sl", "swop", "swci", "admin"}
OPERATORS = {"swci", "admin"}
EXPECTED = {
    "register_node": EVERYONE_BUT_UI,
    "trust_ca": {"admin"},
    "map_cert": {"admin"},
    "revoke_cert": {"admin"},
    "contract_create": OPERATORS,
    "contract_update": OPERATORS,
    "contract_reset": OPERATORS,
    "task_create": OPERATORS,
    "task_append": OPERATORS,
    "task_finalize": OPERATORS,
    "task_delete": OPERATORS,
    "taskrunner_create": OPERATORS,
    "taskrunner_join": {"swop"},
    "taskrunner_assign": OPERATORS,
    "taskrunner_claim": {"swop"},
    "taskrunner_peer_status": {"swop"},
    "taskrunner_reset": OPERATORS,
    "session_join": {"sl"},
    "session_leave": {"sl"},
    "session_evict": {"sl"},
    "checkin": {"sl"},
    "close_round": {"sl"},
    "reelect": {"sl"},
    "merged": {"sl"},
    "round_abort": {"sl"},
    "metrics": {"sl"},
    "checkpoint": {"sn"},
    "secagg_shares": {"sl"},
    "secagg_masking": {"sl"},
    "secagg_masked": {"sl"},
    "secagg_survivors": {"sl"},
    "secagg_reveal": {"sl"},
}

# One plausible payload per kind; whether it passes the kind's own check does not matter here.
PAYLOADS = {
    "trust_ca": {"cert": ca_pem("other-sl"), "org": "other", "roles": ["sl"]},
    "map_cert": {"cert": "x", "role": "sl", "name": "n"},
    "revoke_cert": {"cert_fp": "ab" * 32},
    "contract_create": {"name": "c2"},
    "contract_update": {"name": "c2", "limits": {"max_min_peers": 2}},
    "contract_reset": {"name": "c2"},
    "task_create": {"name": "t2", "type": "RUN_SWARM", "prereq": "ROOTTASK", "body": {}},
    "task_append": {"name": "t1", "body": {}},
    "task_finalize": {"name": "t1"},
    "task_delete": {"name": "t1"},
    "taskrunner_create": {"name": "r2"},
    "taskrunner_join": {"runner": RUNNER, "capacity": 1},
    "taskrunner_assign": {"runner": RUNNER, "task": "t1", "peers": 1},
    "taskrunner_claim": {"runner": RUNNER, "generation": 1, "peers": ["p"]},
    "taskrunner_peer_status": {"runner": RUNNER, "generation": 1, "peer": "p", "status": "RUNNING"},
    "taskrunner_reset": {"runner": RUNNER},
    "session_join": {"contract": CONTRACT, "node": "n"},
    "session_leave": {"contract": CONTRACT, "node": "n"},
    "session_evict": {"contract": CONTRACT, "node": "n"},
    "checkin": {"contract": CONTRACT, "round": 1, "node": "n", "hash": "h", "weight": 1},
    "close_round": {"contract": CONTRACT, "round": 1, "participants": ["n"], "leader": "n"},
    "reelect": {"contract": CONTRACT, "round": 1, "failed": "n", "leader": "m"},
    "merged": {"contract": CONTRACT, "round": 1, "hash": "h"},
    "round_abort": {"contract": CONTRACT, "round": 1},
    "metrics": {"contract": CONTRACT, "node": "n", "loss": 1.0},
    "checkpoint": {"index": 0, "state_hash": "ab" * 32},
    "secagg_shares": {"contract": CONTRACT, "round": 1, "node": "n", "shares": {"n": "x"}},
    "secagg_masking": {"contract": CONTRACT, "round": 1, "nodes": ["n"]},
    "secagg_masked": {"contract": CONTRACT, "round": 1, "node": "n", "hash": "h", "size": 1},
    "secagg_survivors": {"contract": CONTRACT, "round": 1, "nodes": ["n"]},
    "secagg_reveal": {"contract": CONTRACT, "round": 1, "node": "n", "shares": {"n": "x"}},
}


def founded() -> LedgerState:
    state = LedgerState()
    add(state, "sn-1", "genesis", genesis_payload())
    for name in ("swop-1", "swci-1", "admin-1", "node1", "node2", "node3"):
        add(state, name, "register_node", reg(name))
    return state


def add(state: LedgerState, name: str, kind: str, payload: dict, cert_fp: str | None = None) -> None:
    state.apply_tx(tx(name, kind, payload, cert_fp), state.head_index + 1)
    state.head_index += 1


def refused_for_role(state: LedgerState, name: str, kind: str, payload: dict) -> bool:
    """Whether the kind's policy refuses `name`'s role (as opposed to the kind's own checks)."""
    try:
        copy.deepcopy(state).check_tx(tx(name, kind, payload))
    except Rejected as exc:
        return "may be submitted by" in str(exc) or "not a registered node" in str(exc)
    return False


BASE = founded()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_kind_is_open_to_exactly_the_roles_of_the_hand_written_matrix(kind):
    payload = PAYLOADS.get(kind)
    allowed = set()
    for role, name in ROLE_HOLDERS.items():
        body = reg(name) if kind == "register_node" else {k: (name if v == "n" else v) for k, v in payload.items()}
        if not refused_for_role(BASE, name, kind, body):
            allowed.add(role)
    assert allowed == EXPECTED[kind]


def test_the_table_covers_every_kind_and_prints_one_row_each():
    assert set(EXPECTED) | {"genesis"} == {k.value for k in POLICY}
    rows = policy_table()
    assert len(rows) == 2 + len(POLICY) and all(row.count("|") == 4 for row in rows)


def test_only_an_sn_certificate_founds_a_swarm():
    for name in ("node1", "swci-1", "admin-1"):
        with pytest.raises(Rejected, match="only an SN"):
            LedgerState().check_tx(tx(name, "genesis", {**genesis_payload(), "sn": reg(name)}))
    LedgerState().check_tx(tx("sn-1", "genesis", genesis_payload()))


# --------------------------------------------------------------------------- identity from certificates

def test_a_registration_cannot_declare_a_role_or_another_name():
    for extra in ({"role": "SN"}, {"org": "other"}, {"subject": "x"}):
        with pytest.raises(Rejected, match="read from its certificate"):
            BASE.check_tx(tx("node4", "register_node", {**reg("node4"), **extra}))
    with pytest.raises(Rejected, match="a node's id is the name in its certificate"):
        BASE.check_tx(tx("node4", "register_node", {**reg("node4"), "node_id": "node77"}))


def test_node_ids_cannot_be_squatted():
    # The attacker's certificate names node4: it can only ever be node4, never node77 or node1.
    with pytest.raises(Rejected, match="the certificate carried is not the one that signed"):
        BASE.check_tx(tx("node1", "register_node", reg("node4")))
    with pytest.raises(Rejected, match="a node's id is the name in its certificate"):
        BASE.check_tx(tx("node1", "register_node", {**reg("node4"), "node_id": "node1"}, FP["node4"]))


def test_a_certificate_without_a_role_is_refused_until_an_admin_maps_it(tmp_path):
    ca = ident("sn-1").cas[0]
    ca_key = pki._load_key(pki.CertLayout(ident("sn-1").cert_path.parent, 1).ca_key)
    key, legacy = _issue(ca_key, ca, "test", spiffe=None, common_name="legacy-node")
    identity = pki.Identity(tmp_path / "k", tmp_path / "c", tmp_path, key, legacy, [ca])
    payload = {"node_id": "legacy-node", "address": "", "cert": pki.cert_to_pem(legacy).decode()}
    with pytest.raises(Rejected, match="carries no swarm role and name; re-issue it"):
        BASE.check_tx(tx("legacy-node", "register_node", payload, identity.fingerprint))
    state = copy.deepcopy(BASE)
    add(state, "admin-1", "map_cert", {"cert": payload["cert"], "role": "sl", "name": "legacy-node"})
    add(state, "legacy-node", "register_node", payload, identity.fingerprint)
    assert state.nodes["legacy-node"].spiffe_id == "spiffe://test/sl/legacy-node"


# --------------------------------------------------------------------------- CAs bound to organizations

def test_another_organizations_ca_issues_only_its_own_org_and_granted_roles():
    state = copy.deepcopy(BASE)
    with pytest.raises(Rejected, match="cannot grant the admin role"):
        state.check_tx(tx("admin-1", "trust_ca", {"cert": ca_pem("other-sl"), "org": "other",
                                                  "roles": ["sl", "admin"]}))
    with pytest.raises(Rejected, match="issues for organization 'other', not 'test'"):
        state.check_tx(tx("admin-1", "trust_ca", {"cert": ca_pem("other-sl"), "org": "test", "roles": ["sl"]}))
    with pytest.raises(Rejected, match="not issued by a CA this swarm trusts"):
        state.check_tx(tx("other-sl", "register_node", reg("other-sl")))
    add(state, "admin-1", "trust_ca", {"cert": ca_pem("other-sl"), "org": "other", "roles": ["sl"]})
    add(state, "other-sl", "register_node", reg("other-sl"))
    assert state.nodes["other-sl"].spiffe_id == "spiffe://other/sl/other-sl"
    with pytest.raises(Rejected, match="may not issue swci certificates"):
        state.check_tx(tx("swci-2", "register_node", reg("swci-2")))
    with pytest.raises(Rejected, match="may not issue admin certificates"):
        state.check_tx(tx("admin-2", "register_node", reg("admin-2")))


def test_a_trusted_ca_cannot_mint_identities_of_the_sentinels_organization(tmp_path):
    state = copy.deepcopy(BASE)
    add(state, "admin-1", "trust_ca", {"cert": ca_pem("other-sl"), "org": "other", "roles": ["sl", "swci"]})
    other_ca = ident("other-sl").cas[0]
    other_key = pki._load_key(pki.CertLayout(ident("other-sl").cert_path.parent, 2).ca_key)
    key, forged = _issue(other_key, other_ca, "other", spiffe="spiffe://test/admin/admin-9", common_name="admin-9")
    payload = {"node_id": "admin-9", "address": "", "cert": pki.cert_to_pem(forged).decode()}
    with pytest.raises(Rejected, match="names organization test, but its CA issues for other only"):
        state.check_tx(tx("admin-9", "register_node", payload, pki.cert_fingerprint(forged)))


# --------------------------------------------------------------------------- revocation and rotation

def test_a_revoked_certificate_is_refused_and_its_node_may_rotate_to_a_new_one(tmp_path):
    state = copy.deepcopy(BASE)
    add(state, "node1", "session_join", {"contract": CONTRACT, "node": "node1"})
    add(state, "admin-1", "revoke_cert", {"cert_fp": FP["node1"], "reason": "laptop stolen"})
    with pytest.raises(Rejected, match="revoked"):
        state.check_tx(tx("node1", "session_leave", {"contract": CONTRACT, "node": "node1"}))
    with pytest.raises(Rejected, match="revoked"):
        state.check_tx(tx("node1", "register_node", reg("node1")))
    # A new certificate under the same name from the same organization and role takes over.
    layout = pki.CertLayout(tmp_path, 1)
    ca_dir = pki.CertLayout(ident("sn-1").cert_path.parent, 1)
    pki.generate_host_certs(layout.root, 1, nodes=["node1"], components=(), ca_cert_path=ca_dir.ca_cert,
                            ca_key_path=ca_dir.ca_key)
    fresh = pki.Identity.load(layout.node_key("node1"), layout.node_cert("node1"), layout.capath)
    add(state, "node1", "register_node", {"node_id": "node1", "address": "", "cert": fresh.cert_pem.decode()},
        fresh.fingerprint)
    add(state, "node1", "session_leave", {"contract": CONTRACT, "node": "node1"}, fresh.fingerprint)
    with pytest.raises(Rejected, match="cannot revoke the certificate it signs with"):
        state.check_tx(tx("admin-1", "revoke_cert", {"cert_fp": FP["admin-1"]}))


# --------------------------------------------------------------------------- bounds on what members declare

def test_a_member_cannot_stall_the_contract_with_min_peers_or_a_declared_size():
    state = copy.deepcopy(BASE)
    with pytest.raises(Rejected, match="allows at most 16"):
        state.check_tx(tx("node1", "session_join", {"contract": CONTRACT, "node": "node1", "min_peers": 1000}))
    add(state, "node1", "session_join", {"contract": CONTRACT, "node": "node1", "min_peers": 1})
    with pytest.raises(Rejected, match="declares 1000000000000 bytes"):
        state.check_tx(tx("node1", "checkin", {"contract": CONTRACT, "round": 1, "node": "node1", "hash": "h",
                                               "weight": 1, "size": 10**12}))
    with pytest.raises(Rejected, match="allows at most 16384 per report"):
        state.check_tx(tx("node1", "metrics", {"contract": CONTRACT, "node": "node1", "blob": "x" * 20000}))


def test_contract_limits_are_set_by_its_creator_and_the_defaults_by_an_admin_only():
    state = copy.deepcopy(BASE)
    add(state, "swci-1", "contract_create", {"name": "study", "peers": ["node1", "node2"]})
    assert state.contracts["study"].limits.max_min_peers == 2  # named peers: no more than all of them
    with pytest.raises(Rejected, match="allows at most 2"):
        state.check_tx(tx("node1", "session_join", {"contract": "study", "node": "node1", "min_peers": 3}))
    limits = {"max_min_peers": 4}
    with pytest.raises(Rejected, match="only an admin may change the default contract"):
        state.check_tx(tx("swci-1", "contract_update", {"name": CONTRACT, "limits": limits}))
    add(state, "admin-1", "contract_update", {"name": CONTRACT, "limits": limits})
    assert state.contracts[CONTRACT].limits.max_min_peers == 4
    add(state, "swci-1", "contract_update", {"name": "study", "peers": ["node1", "node2", "node3"]})
    assert state.contracts["study"].peers == ["node1", "node2", "node3"]


def test_only_a_tasks_creator_or_an_admin_changes_it():
    state = copy.deepcopy(BASE)
    add(state, "swci-1", "task_create", {"name": "t1", "type": "RUN_SWARM", "prereq": "ROOTTASK",
                                         "body": {"Command": "model.py"}})
    add(state, "admin-1", "task_create", {"name": "t2", "type": "RUN_SWARM", "prereq": "ROOTTASK", "body": {}})
    with pytest.raises(Rejected, match="only admin-1, who created task t2, or an admin may change it"):
        state.check_tx(tx("swci-1", "task_append", {"name": "t2", "body": {"Entrypoint": "/bin/sh"}}))
    add(state, "admin-1", "task_append", {"name": "t1", "body": {"Envvars": ["A"]}})


# --------------------------------------------------------------------------- helpers

def _issue(ca_key, ca_cert, org: str, spiffe: str | None, common_name: str):
    """A certificate as another tool would make it: with a SPIFFE URI of our choosing, or none."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                                        x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    names = [x509.DNSName("localhost")] + ([x509.UniformResourceIdentifier(spiffe)] if spiffe else [])
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


# --------------------------------------------------------------------------- review findings, each an attack

def test_two_cas_of_one_organization_are_not_both_trusted(tmp_path):
    """Else a second host holding its own CA key could issue spiffe://test/sl/node1 and take node1 over."""
    pki.generate_host_certs(tmp_path, 3, org="test")
    second = pki.cert_to_pem(pki.load_ca_certs(pki.CertLayout(tmp_path, 3).capath)[0][1]).decode()
    genesis = genesis_payload()
    genesis["cas"] = [*genesis["cas"], {"cert": second, "org": "test", "roles": ["sl"]}]
    with pytest.raises(Rejected, match="two CAs of one organization"):
        LedgerState().check_tx(tx("sn-1", "genesis", genesis))
    with pytest.raises(Rejected, match="organization test already has a trusted CA"):
        BASE.check_tx(tx("admin-1", "trust_ca", {"cert": second, "org": "test", "roles": ["sl"]}))


def test_a_declared_identity_inside_genesis_is_refused_too():
    genesis = genesis_payload()
    genesis["sn"] = {**genesis["sn"], "role": "admin"}
    with pytest.raises(Rejected, match="read from its certificate"):
        LedgerState().check_tx(tx("sn-1", "genesis", genesis))


def test_a_check_in_weight_cannot_swamp_the_mean():
    state = copy.deepcopy(BASE)
    add(state, "node1", "session_join", {"contract": CONTRACT, "node": "node1"})
    with pytest.raises(Rejected, match="weight"):
        state.check_tx(tx("node1", "checkin", {"contract": CONTRACT, "round": 1, "node": "node1", "hash": "h",
                                               "weight": 1e308}))


def test_another_swci_cannot_reset_a_running_assignment():
    state = copy.deepcopy(BASE)
    add(state, "admin-1", "trust_ca", {"cert": ca_pem("other-sl"), "org": "other", "roles": ["swci"]})
    add(state, "swci-2", "register_node", reg("swci-2"))
    add(state, "swop-1", "taskrunner_join", {"runner": RUNNER, "capacity": 1})
    add(state, "swci-1", "task_create", {"name": "t1", "type": "RUN_SWARM", "prereq": "ROOTTASK", "body": {}})
    add(state, "swci-1", "task_finalize", {"name": "t1"})
    add(state, "swci-1", "taskrunner_assign", {"runner": RUNNER, "task": "t1", "peers": 1})
    with pytest.raises(Rejected, match="only they, sn-1 .* or an admin may reset it"):
        state.check_tx(tx("swci-2", "taskrunner_reset", {"runner": RUNNER}))
    add(state, "admin-1", "taskrunner_reset", {"runner": RUNNER})


def test_changing_one_contract_limit_keeps_the_others():
    state = copy.deepcopy(BASE)
    add(state, "admin-1", "contract_update", {"name": CONTRACT, "limits": {"max_blob_bytes": 1 << 20}})
    add(state, "admin-1", "contract_update", {"name": CONTRACT, "limits": {"max_min_peers": 4}})
    limits = state.contracts[CONTRACT].limits
    assert (limits.max_min_peers, limits.max_blob_bytes, limits.max_metrics_bytes) == (4, 1 << 20, 16 << 10)


def test_a_member_that_left_reports_no_metrics():
    state = copy.deepcopy(BASE)
    add(state, "node1", "session_join", {"contract": CONTRACT, "node": "node1"})
    add(state, "node1", "metrics", {"contract": CONTRACT, "node": "node1", "loss": 0.5})
    add(state, "node1", "session_leave", {"contract": CONTRACT, "node": "node1"})
    with pytest.raises(Rejected, match="has not joined"):
        state.check_tx(tx("node1", "metrics", {"contract": CONTRACT, "node": "node1", "loss": 0.4}))
