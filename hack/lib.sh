# Shared by hack/run.sh and hack/test.sh: finding or starting the cluster they use.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$ROOT/hack/versions.env"
CACHE=${CAPSTAN_CACHE:-$ROOT/.cache}
export PATH="$CACHE/bin/helm-$HELM_VERSION:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Installs a Debian package unless it is installed (the machine reaches Debian's apt).
debian_package() {
  dpkg -s "$1" >/dev/null 2>&1 && return
  say "installing $1 (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$1" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$1" >/dev/null; }
}

# True when KUBECONFIG (or kubectl's default) names a cluster that answers.
external_cluster_answers() {
  [ -n "${KUBECONFIG:-}" ] || [ -f "$HOME/.kube/config" ] || return 1
  kubectl --request-timeout=5s get --raw /readyz >/dev/null 2>&1
}

# Uses the cluster KUBECONFIG names when it answers; otherwise starts (or reuses) the
# local control plane named $1 and points KUBECONFIG at it. Sets CAPSTAN_STARTED_CLUSTER
# to the local cluster's name when it is ours.
use_cluster() {
  local name=$1
  CAPSTAN_STARTED_CLUSTER=""
  if external_cluster_answers; then
    say "using the cluster in ${KUBECONFIG:-$HOME/.kube/config} ($(kubectl config current-context 2>/dev/null || echo '?'))"
    return 0
  fi
  say "no cluster in KUBECONFIG answers: starting a local control plane ($name)"
  CAPSTAN_CLUSTER_NAME=$name "$ROOT/hack/cluster.sh" up >/dev/null
  export KUBECONFIG=$CACHE/$name.kubeconfig
  CAPSTAN_STARTED_CLUSTER=$name
}
