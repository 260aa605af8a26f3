"""The secrets engine driven by hvac, a real Vault client nobody here wrote.

Run by tests/tests/e2e_secrets.rs against a fresh engine. Environment:
VAULT_ADDR, VAULT_CACERT (the mesh roots), SA_JWT (a token of ServiceAccount
SA_NAMESPACE/SA_NAME for audience capstan-engine), OTHER_JWT (a token of a
ServiceAccount the role does not bind), WRONG_AUDIENCE_JWT (SA_NAME's token
for another audience). Prints one JSON line with what the Rust side checks
further (the secret values it must not find in logs, the root token).
"""

import json
import os
import sys

import hvac
from hvac import exceptions

addr = os.environ["VAULT_ADDR"]
ca = os.environ["VAULT_CACERT"]
ns = os.environ["SA_NAMESPACE"]
sa = os.environ["SA_NAME"]


def refused(exc_types, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc_types as error:
        return error
    raise AssertionError(f"{fn.__name__} was not refused")


client = hvac.Client(url=addr, verify=ca)

# Init: 5 shares, threshold 3; the engine stays sealed.
assert client.sys.is_initialized() is False
init = client.sys.initialize(secret_shares=5, secret_threshold=3)
keys, keys_b64, root = init["keys"], init["keys_base64"], init["root_token"]
assert len(keys) == 5 and len(keys_b64) == 5 and root
assert client.sys.is_initialized() is True
assert client.sys.is_sealed() is True
refused(exceptions.InvalidRequest, client.sys.initialize, 1, 1)

# Sealed: everything but seal status and unseal is refused.
client.token = root
refused(exceptions.VaultDown, client.secrets.kv.v2.read_secret_version, path="app/db")
refused(exceptions.VaultDown, client.sys.list_acl_policies)

# Unseal with t of n: a duplicate share is refused and keeps progress; hex and
# base64 shares both work; fewer than t leaves it sealed.
status = client.sys.submit_unseal_key(keys[0])
assert status["sealed"] and status["progress"] == 1 and status["t"] == 3 and status["n"] == 5
refused(exceptions.InvalidRequest, client.sys.submit_unseal_key, keys[0])
status = client.sys.read_seal_status()
assert status["sealed"] and status["progress"] == 1
status = client.sys.submit_unseal_key(keys_b64[3])
assert status["sealed"] and status["progress"] == 2
status = client.sys.submit_unseal_key(keys[4])
assert status["sealed"] is False, status
assert client.sys.is_sealed() is False
# sys/leader as the vault CLI's `status` reads it (issue 15 item 10): no HA, no leader.
leader = client.sys.read_leader_status()
assert leader["ha_enabled"] is False and leader["is_self"] is False, leader

# KV v2: versions, check-and-set, soft delete, undelete, destroy, metadata, list.
kv = client.secrets.kv.v2
written = kv.create_or_update_secret(path="app/db", secret={"password": "hvac-canary-v1"})
assert written["data"]["version"] == 1
refused(exceptions.InvalidRequest, kv.create_or_update_secret, path="app/db", secret={"password": "x"}, cas=0)
kv.create_or_update_secret(path="app/db", secret={"password": "hvac-canary-v2"}, cas=1)
latest = kv.read_secret_version(path="app/db", raise_on_deleted_version=True)
assert latest["data"]["data"] == {"password": "hvac-canary-v2"}, latest
assert latest["data"]["metadata"]["version"] == 2
first = kv.read_secret_version(path="app/db", version=1, raise_on_deleted_version=True)
assert first["data"]["data"] == {"password": "hvac-canary-v1"}
meta = kv.read_secret_metadata(path="app/db")
assert meta["data"]["current_version"] == 2 and sorted(meta["data"]["versions"]) == ["1", "2"]
kv.delete_latest_version_of_secret(path="app/db")
refused(exceptions.InvalidPath, kv.read_secret_version, path="app/db", raise_on_deleted_version=True)
kv.undelete_secret_versions(path="app/db", versions=[2])
assert kv.read_secret_version(path="app/db", raise_on_deleted_version=True)["data"]["data"]["password"] == "hvac-canary-v2"
kv.destroy_secret_versions(path="app/db", versions=[1])
refused(exceptions.InvalidPath, kv.read_secret_version, path="app/db", version=1, raise_on_deleted_version=True)
kv.create_or_update_secret(path="other/x", secret={"v": "1"})
assert kv.list_secrets(path="app")["data"]["keys"] == ["db"]
assert sorted(kv.list_secrets(path="")["data"]["keys"]) == ["app/", "other/"]

# A policy and a Kubernetes auth role; login with the ServiceAccount's token.
client.sys.create_or_update_acl_policy(
    name="app-read",
    policy='path "secret/data/app/*" { capabilities = ["read"] }\n'
    'path "auth/token/create" { capabilities = ["update"] }',
)
assert "app-read" in client.sys.list_acl_policies()["data"]["keys"]
client.auth.kubernetes.create_role(
    name="app",
    bound_service_account_names=[sa],
    bound_service_account_namespaces=[ns],
    policies=["app-read"],
    ttl="1h",
)
app = hvac.Client(url=addr, verify=ca)
login = app.auth.kubernetes.login(role="app", jwt=os.environ["SA_JWT"])
auth = login["auth"]
assert sorted(auth["policies"]) == ["app-read", "default"], auth
assert auth["metadata"]["service_account_name"] == sa
assert auth["metadata"]["service_account_namespace"] == ns
assert auth["metadata"]["service_account_uid"]
assert 0 < auth["lease_duration"] <= 3600
assert app.is_authenticated()
assert app.secrets.kv.v2.read_secret_version(path="app/db", raise_on_deleted_version=True)["data"]["data"]["password"] == "hvac-canary-v2"
# Outside the policy: refused.
refused(exceptions.Forbidden, app.secrets.kv.v2.read_secret_version, path="other/x", raise_on_deleted_version=True)
refused(exceptions.Forbidden, app.secrets.kv.v2.create_or_update_secret, path="app/db", secret={"password": "y"})
refused(exceptions.Forbidden, app.sys.list_acl_policies)
# Another ServiceAccount, another audience, garbage: refused.
stranger = hvac.Client(url=addr, verify=ca)
refused(exceptions.Forbidden, stranger.auth.kubernetes.login, role="app", jwt=os.environ["OTHER_JWT"])
refused(exceptions.Forbidden, stranger.auth.kubernetes.login, role="app", jwt=os.environ["WRONG_AUDIENCE_JWT"])
refused(exceptions.Forbidden, stranger.auth.kubernetes.login, role="app", jwt="not-a-token")
refused(exceptions.Forbidden, stranger.auth.kubernetes.login, role="nope", jwt=os.environ["SA_JWT"])

# Tokens: a child of the app token, revoked with its parent.
child = app.auth.token.create(policies=["app-read"], ttl="10m")["auth"]["client_token"]
child_client = hvac.Client(url=addr, verify=ca, token=child)
assert child_client.is_authenticated()
refused(exceptions.InvalidRequest, app.auth.token.create, policies=["root"])
renewed = app.auth.token.renew_self(increment="30m")
assert 0 < renewed["auth"]["lease_duration"] <= 1800
app.auth.token.revoke_self()
assert not app.is_authenticated()
assert not child_client.is_authenticated()

# Seal again: refused until unsealed.
client.sys.seal()
assert client.sys.is_sealed()
refused(exceptions.VaultDown, kv.read_secret_version, path="app/db")
for key in keys[:3]:
    client.sys.submit_unseal_key(key)
assert not client.sys.is_sealed()
assert kv.read_secret_version(path="app/db", raise_on_deleted_version=True)["data"]["data"]["password"] == "hvac-canary-v2"

print(json.dumps({"root_token": root, "canaries": ["hvac-canary-v1", "hvac-canary-v2"], "keys": keys}))
sys.exit(0)
