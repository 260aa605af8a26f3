#!/usr/bin/env bash
# Runs Capstan against the cluster KUBECONFIG names, or against a local control plane it
# starts when there is none: installs the chart (CRDs, RBAC, ServiceAccounts), runs
# capstan-controller with the chart's own ServiceAccount token, applies examples/, and
# prints what to try. Ctrl-C stops the controller (the local cluster stays up;
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
  --set controller.replicas=0 --set webhook.replicas=0 --wait --timeout 120s >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null

# The controller acts with exactly the chart's RBAC: a token of its ServiceAccount.
sa_config=$CACHE/capstan-controller.kubeconfig
kubectl config view --minify --raw >"$sa_config"
token=$(kubectl create token capstan-controller -n "$ns" --duration=24h)
kubectl --kubeconfig "$sa_config" config set-credentials capstan-controller --token="$token" >/dev/null
kubectl --kubeconfig "$sa_config" config set-context --current --user=capstan-controller >/dev/null

say "starting capstan-controller (logs: .cache/capstan-controller.log)"
KUBECONFIG=$sa_config CAPSTAN_LOG_FORMAT=text target/debug/capstan-controller \
  --namespace "$ns" --lease-name capstan-controller --admin-addr 127.0.0.1:8080 \
  >"$CACHE/capstan-controller.log" 2>&1 &
controller=$!
trap 'kill -TERM $controller 2>/dev/null; wait $controller 2>/dev/null; say "controller stopped"' EXIT INT TERM

kubectl apply -f examples/ >/dev/null
for name in api db; do
  if ! kubectl wait --for=condition=Ready "serviceintentions/$name" -n shop --timeout=60s >/dev/null; then
    tail -n 30 "$CACHE/capstan-controller.log" >&2
    exit 1
  fi
done
kubectl get serviceintentions -n shop

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

Ctrl-C stops the controller. hack/cluster.sh down stops the local cluster, if one was started.
HELP
wait $controller
