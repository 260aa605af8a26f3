#!/usr/bin/env bash
# Runs Capstan against the cluster KUBECONFIG names, or against a local control plane it
# starts when there is none: installs the chart (CRDs, RBAC, ServiceAccounts, webhook
# configurations), runs capstan-controller, capstan-engine (the mesh CA) and
# capstan-webhook here, each with its chart ServiceAccount's own token, applies examples/,
# and prints what to try. Ctrl-C stops them (the local cluster stays up;
# `hack/cluster.sh down` stops it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

say "building Capstan"
cargo build --workspace --bins --locked
"$ROOT/hack/cluster.sh" build
use_cluster capstan

ns=capstan-system
say "installing the chart into $ns"
# The controller runs here, out of the cluster, so the chart's own Deployments start
# with no replicas; on a cluster that has the image (see README, kind), leave them on.
helm upgrade --install capstan charts/capstan --namespace "$ns" --create-namespace \
  --set controller.replicas=0 --set webhook.replicas=0 --set engine.replicas=0 \
  --set engine.devAutoUnseal=true --wait --timeout 120s >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

# Each process acts with exactly the chart's RBAC: a token of its own ServiceAccount.
sa_kubeconfig() {
  local sa=$1 config=$CACHE/$1.kubeconfig
  kubectl config view --minify --raw >"$config"
  kubectl --kubeconfig "$config" config set-credentials "$sa" \
    --token="$(kubectl create token "$sa" -n "$ns" --duration=24h)" >/dev/null
  kubectl --kubeconfig "$config" config set-context --current --user="$sa" >/dev/null
  echo "$config"
}
pids=()
stop_all() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  say "stopped"
}
trap stop_all EXIT
trap 'exit 130' INT TERM
start() {
  local name=$1; shift
  say "starting $name (logs: .cache/$name.log)"
  KUBECONFIG=$(sa_kubeconfig "$name") CAPSTAN_LOG_FORMAT=text "target/debug/$name" "$@" \
    >"$CACHE/$name.log" 2>&1 &
  pids+=($!)
}
start capstan-controller --namespace "$ns" --lease-name capstan-controller --admin-addr 127.0.0.1:8080 \
  --engine-url https://127.0.0.1:8200
# Development auto-unseal: the unseal key and a root token go to Secret
# capstan-engine-unseal (never do this in production; see engine/README.md).
start capstan-engine --namespace "$ns" --listen 127.0.0.1:8200 --admin-addr 127.0.0.1:8082 \
  --dev-auto-unseal capstan-engine-unseal --audit "$CACHE/engine-audit.log"
start capstan-webhook --namespace "$ns" --listen 127.0.0.1:8443 --admin-addr 127.0.0.1:8081 \
  --external-url https://127.0.0.1:8443 --ca-url https://127.0.0.1:8200
controller=${pids[0]}

kubectl apply -f examples/ >/dev/null
for name in api db; do
  if ! kubectl wait --for=condition=Ready "serviceintentions/$name" -n shop --timeout=60s >/dev/null; then
    tail -n 30 "$CACHE/capstan-controller.log" "$CACHE/capstan-engine.log" "$CACHE/capstan-webhook.log" >&2
    exit 1
  fi
done
kubectl get serviceintentions -n shop
# The jobs reconciler records each Job's first version; its pods then run on the cluster's
# nodes (on the local control plane, kwok's simulated ones).
if ! kubectl wait --for=jsonpath='{.status.version}'=1 cjob/web -n shop --timeout=60s >/dev/null; then
  tail -n 30 "$CACHE/capstan-controller.log" >&2
  exit 1
fi
kubectl get cjob -n shop
for _ in $(seq 60); do
  kubectl get configmap capstan-mesh-roots -n "$ns" -o jsonpath='{.data.roots\.pem}' >"$CACHE/mesh-roots.pem" 2>/dev/null || true
  if [ -s "$CACHE/mesh-roots.pem" ] &&
    curl -sf --cacert "$CACHE/mesh-roots.pem" https://127.0.0.1:8200/v1/sys/health >/dev/null; then
    break
  fi
  sleep 1
done
if ! curl -sf --cacert "$CACHE/mesh-roots.pem" https://127.0.0.1:8200/v1/sys/health >/dev/null; then
  say "the secrets engine did not unseal"
  tail -n 30 "$CACHE/capstan-engine.log" >&2
  exit 1
fi

cat <<HELP

Capstan is running. Try, in another shell:

  export KUBECONFIG=${KUBECONFIG:-$HOME/.kube/config}
  kubectl get capstan -A                           # every Capstan object
  kubectl describe serviceintentions api -n shop   # status conditions and events
  kubectl edit serviceintentions api -n shop       # change it; status follows
  kubectl apply -f - <<<'{"apiVersion":"mesh.capstan.dev/v1alpha1","kind":"ServiceIntentions",
    "metadata":{"name":"api-2","namespace":"shop"},"spec":{"destination":{"name":"api"}}}'
                                                   # a second object for one destination: Conflict
  target/debug/capstan intentions check admin api -n shop --path /admin --method POST
                                                   # what would the sidecar decide, and by which rule?
  curl -s localhost:8080/metrics | grep capstan_   # the controller's metrics
  kubectl get configmap capstan-mesh-roots -n $ns -o jsonpath='{.data.roots\.pem}'
                                                   # the mesh CA's trust bundle (capstan-engine)
  kubectl label namespace shop capstan.dev/mesh=enabled
  kubectl run web -n shop --image=nginx --dry-run=server -o yaml
                                                   # the webhook injects the mTLS sidecar
  kubectl apply -f - <<<'{"apiVersion":"mesh.capstan.dev/v1alpha1","kind":"ServiceIntentions",
    "metadata":{"name":"bad","namespace":"shop"},"spec":{"destination":{"name":"x"},
    "sources":[{"name":"a","action":"allow"},{"name":"a","action":"deny"}]}}'
                                                   # refused at the door: duplicate source

Jobs (Nomad's job model; examples/job.yaml and examples/job-dispatch.yaml):

  kubectl get cjob -n shop                         # TYPE PRIORITY VERSION RUNNING DESIRED STATUS
  target/debug/capstan job status web -n shop      # like nomad job status: groups, datacenters, deployment
  kubectl patch cjob web -n shop --type merge -p '{"spec":{"groups":[{"name":"frontend","count":3,
    "tasks":[{"name":"server","image":"nginx:1.28","ports":[{"name":"http","port":80}]}],
    "services":[{"name":"web","port":"http","checks":[{"type":"http","path":"/"}]}]}]}}'
                                                   # version 2: one canary beside version 1
  target/debug/capstan job promote web -n shop     # promote the canary (autoPromote does it too)
  target/debug/capstan job history web -n shop     # versions, the stable mark, what changed
  target/debug/capstan job revert web 1 -n shop    # back to version 1's spec
  target/debug/capstan job dispatch report -n shop --meta customer=acme --payload README.md
                                                   # a child run with its meta and payload
  target/debug/capstan job dispatch report -n shop # refused: meta customer is required
  target/debug/capstan job plan examples/job.yaml  # what applying would change (server dry run)
  target/debug/capstan job convert my.nomad.hcl    # a Nomad jobspec as a Job

The secrets engine (Vault's API; any Vault client works) is unsealed for development:

  export VAULT_ADDR=https://127.0.0.1:8200 VAULT_CACERT=$CACHE/mesh-roots.pem
  export VAULT_TOKEN=\$(kubectl get secret capstan-engine-unseal -n $ns -o jsonpath='{.data.root-token}' | base64 -d)
  curl -s --cacert \$VAULT_CACERT -H "X-Vault-Token: \$VAULT_TOKEN" \$VAULT_ADDR/v1/secret/data/app/db \
    -d '{"data":{"password":"hunter2"}}'            # KV v2: version 1
  curl -s --cacert \$VAULT_CACERT -H "X-Vault-Token: \$VAULT_TOKEN" \$VAULT_ADDR/v1/secret/data/app/db
  kubectl get storageentries -n $ns                # what etcd holds: ciphertext only
  tail -n 2 .cache/engine-audit.log                # every request audited, values HMAC'd

The sidecar's data path (mTLS, intentions) runs in tests/tests/e2e_mesh_dataplane.rs:
pods as network namespaces; see README "Mesh".
Ctrl-C stops Capstan's processes. hack/cluster.sh down stops the local cluster, if one was started.
HELP
wait "$controller"
